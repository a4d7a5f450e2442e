"""`memfs run`: an unmodified tool sees memfs at /dev/mem and /proc/iomem.

The tool runs in a private mount namespace (unshare -m) in which /dev is a
tmpfs holding bind mounts of the real /dev entries plus MOUNT/dev/mem, and
MOUNT/proc/iomem is bound over /proc/iomem. The host's /dev is never touched.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile


def run_in_namespace(mountpoint: str, command: list[str]) -> int:
    """Run `command` in a fresh mount namespace; returns its exit status."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("memfs run: no command given (memfs run MOUNT -- TOOL ARGS...)", file=sys.stderr)
        return 2
    for part in ("dev/mem", "proc/iomem"):
        if not os.path.exists(os.path.join(mountpoint, part)):
            print(f"memfs run: {mountpoint}/{part} missing: is memfs mounted there?", file=sys.stderr)
            return 2
    inner = [sys.executable, "-m", "memfs.nsrun", os.path.abspath(mountpoint), *command]
    status = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", *inner]).returncode
    if status < 0:  # killed by a signal (SIGBUS from a refused page): report it as a shell does
        print(f"memfs run: {command[0]} killed by {signal.Signals(-status).name}", file=sys.stderr)
        return 128 - status
    return status


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _inner(mountpoint: str, command: list[str]) -> None:
    """Inside the namespace: rebuild /dev around memfs's dev/mem, then exec the tool."""
    keep = tempfile.mkdtemp(prefix="memfs-olddev-")
    _mount("--rbind", "/dev", keep)
    _mount("-t", "tmpfs", "-o", "mode=755", "memfs-dev", "/dev")
    for name in os.listdir(keep):
        src, dst = os.path.join(keep, name), os.path.join("/dev", name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
            continue
        if os.path.isdir(src):
            os.mkdir(dst)
        else:
            open(dst, "w").close()
        _mount("--rbind", src, dst)
    open("/dev/mem", "w").close()
    _mount("--bind", os.path.join(mountpoint, "dev/mem"), "/dev/mem")
    _mount("--bind", os.path.join(mountpoint, "proc/iomem"), "/proc/iomem")
    os.execvp(command[0], command)


if __name__ == "__main__":
    _inner(sys.argv[1], sys.argv[2:])
