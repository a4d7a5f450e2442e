"""Real mounts for the acceptance tests: `memfs mount` in a fresh temp dir, always unmounted."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from importlib import resources

# Test inputs that ship with the repository: real /proc/iomem dumps (tests/data/iomem, with
# SOURCES.md) and the observed q35 dump the default machine is built on (memfs's package data).
DATA = Path(__file__).parent / "data"
DUMPS = sorted((DATA / "iomem").glob("*.txt"))
QEMU_Q35_2G = Path(str(resources.files("memfs.data").joinpath("qemu-q35-2G.iomem")))
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MEMFS = [sys.executable, "-m", "memfs"]


def memfs(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMFS, *args], capture_output=True, text=True, check=check, timeout=120, **kw)


def as_nobody(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, timeout=60, **kw)


def _fuse_connection(mnt: str) -> str | None:
    """The fusectl connection number of the mount at `mnt` (its device minor), from mountinfo."""
    target = os.path.abspath(mnt).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[2].split(":")[1]
    return None


def _unmount(mnt: str) -> None:
    """Unmount even a stuck mount: fusermount, then lazily, then abort the FUSE connection."""
    conn = _fuse_connection(mnt)
    if conn is None:
        return
    for args in (["-u"], ["-u", "-z"]):
        subprocess.run(["fusermount3", *args, mnt], capture_output=True, timeout=30)
        if wait_for(lambda: not mounted(mnt), 5):
            return
    if not os.path.isdir(f"/sys/fs/fuse/connections/{conn}"):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"], capture_output=True,
                       timeout=30)
    try:  # a daemon that stopped answering: abort its connection so no process stays in state D
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass
    subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)


class Mounts:
    def __init__(self) -> None:
        self.dirs: list[str] = []

    def __call__(self, *args: str, allow_other: bool = True) -> Path:
        # World-traversable, so uid 65534 can reach the mount.
        base = tempfile.mkdtemp(prefix="memfs-test-")
        os.chmod(base, 0o755)
        mnt = os.path.join(base, "mnt")
        os.mkdir(mnt)
        self.dirs.append(mnt)
        log = os.path.join(base, "memfs.log")
        extra = ["--allow-other"] if allow_other else []
        done = memfs("mount", mnt, "--log", log, *extra, *args)
        assert done.returncode == 0, done.stderr
        return Path(mnt)

    def cleanup(self) -> None:
        for mnt in self.dirs:
            _unmount(mnt)
            shutil.rmtree(os.path.dirname(mnt), ignore_errors=True)


@pytest.fixture
def mount():
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture(scope="module")
def default_mnt():
    """One default-machine mount shared by a module's read-only tests."""
    m = Mounts()
    try:
        yield m()
    finally:
        m.cleanup()


def wait_for(predicate, seconds: float) -> bool:
    """Poll `predicate` until it holds or the deadline passes; returns its last answer."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(0.02)
    return True


def mounted(mnt) -> bool:
    """Whether `mnt` is a mount point, read from mountinfo: never stats a mount that may be stuck."""
    target = os.path.abspath(mnt).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def two_devices(tmp_path, first: str, second: str):
    """A machine file: the Q35 dump plus two virtio-mem devices with 1 GiB regions at 4 GiB and
    5 GiB, each with its extra TOML lines (an id, a size, a node)."""
    toml = tmp_path / "two.toml"
    devices = "".join(f'[[virtio_mem]]\naddr = "{addr}"\nregion_size = "1G"\n{extra}\n'
                      for addr, extra in (("0x100000000", first), ("0x140000000", second)))
    toml.write_text(f'iomem = "{QEMU_Q35_2G}"\n{devices}')
    return toml
