"""`memfs run`: an unmodified tool sees the simulated machine wherever it looks.

The tool runs in a private mount namespace (unshare -m). There /dev is a
tmpfs holding bind mounts of the real /dev entries plus MOUNT/dev/mem, and
the mount's files are bound over their real paths (BINDS): /proc/iomem,
/proc/meminfo, /sys/firmware (SMBIOS and ACPI tables),
/sys/devices/system/memory and /sys/devices/system/node (where the memory
blocks' node links lead). The host's paths are never touched, and nothing
is left behind in /tmp.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

# mount path -> real path; the real path must exist (a sysfs directory cannot be created)
BINDS = (("proc/iomem", "/proc/iomem"), ("proc/meminfo", "/proc/meminfo"), ("sys/firmware", "/sys/firmware"),
         ("sys/devices/system/memory", "/sys/devices/system/memory"),
         ("sys/devices/system/node", "/sys/devices/system/node"))


def run_in_namespace(mountpoint: str, command: list[str]) -> int:
    """Run `command` in a fresh mount namespace; returns its exit status as a shell would."""
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


def _private_dev(mountpoint: str) -> None:
    """Replace /dev by a tmpfs of bind mounts of its entries plus the mount's dev/mem."""
    keep = tempfile.mkdtemp(prefix="memfs-olddev-")
    try:
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
    finally:
        subprocess.run(["umount", "--lazy", "--recursive", keep], capture_output=True)
        os.rmdir(keep)


def _inner(mountpoint: str, command: list[str]) -> int:
    """Inside the namespace: put the mount's files in place, then exec the tool (127/126 as a shell)."""
    _private_dev(mountpoint)
    for part, target in BINDS:
        if os.path.exists(target):
            _mount("--bind", os.path.join(mountpoint, part), target)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"memfs run: {command[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as e:
        print(f"memfs run: {command[0]}: {e.strerror}", file=sys.stderr)
        return 126


if __name__ == "__main__":
    sys.exit(_inner(sys.argv[1], sys.argv[2:]))
