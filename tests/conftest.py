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

SHARED = Path(__file__).resolve().parents[2] / "shared"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MEMFS = [sys.executable, "-m", "memfs"]


def memfs(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMFS, *args], capture_output=True, text=True, check=check, timeout=120, **kw)


def as_nobody(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, timeout=60, **kw)


def _unmount(mnt: str) -> None:
    if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    for _ in range(100):  # the daemon exits once the kernel lets go of the mount
        if not os.path.ismount(mnt):
            return
        time.sleep(0.05)


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
