"""pytest plugin (entry point ``pytest11``, name ``memfs``): a simulated machine per test.

Installed with memfs, so any project's tests can use it with nothing but ``pip install memfs``::

    def test_hotplug(memfs_machine):
        memfs_machine.ctl("virtio0", "requested-size", "2G")
        assert "100000000-17fffffff : System RAM (virtio_mem)" in memfs_machine.iomem()

The fixture ``memfs_machine`` mounts a machine (``memfs mount``, run as ``sys.executable -m
memfs`` so the daemon is a process of its own) on a fresh temporary directory and yields a
`MemfsMachine`. A test picks the machine with the marker::

    @pytest.mark.memfs_machine(machine=PATH | iomem=PATH, settings={"arch": "arm64"}, allow_other=False)

(default: the built-in machine). Teardown always unmounts, whether the test failed, the daemon
died or stopped answering: ``fusermount3 -u``, then ``-u -z``, then the fusectl ``abort`` of
the connection, every step with a deadline; whether something is mounted is read from
/proc/self/mountinfo, never by touching a mount that may hang. A daemon that does not exit
once unmounted gets SIGTERM, then SIGKILL. Like memfs itself the fixture needs root and
/dev/fuse; without them it fails (never skips) and says why.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

MARKER = "memfs_machine"
MARKER_HELP = (f"{MARKER}(machine=PATH | iomem=PATH, settings={{KEY: VALUE}}, allow_other=False): "
               "the machine the memfs_machine fixture mounts (default: memfs's built-in machine)")
MEMFS = [sys.executable, "-m", "memfs"]
MOUNT_TIMEOUT = 60.0    # seconds `memfs mount` may take
COMMAND_TIMEOUT = 60.0  # default for ctl() and run()
STEP_WAIT = 5.0         # seconds each unmount step waits for the mount to disappear
EXIT_WAIT = 5.0         # seconds the daemon gets to exit once unmounted, and again after SIGTERM


class MemfsError(RuntimeError):
    """A memfs mount could not be set up, used or removed; the message says why."""


class MemfsCommandError(MemfsError):
    """A control command failed; `reason` is memfs's explanation (e.g. ``error: ENODEV: ...``)."""

    def __init__(self, words: Sequence[str], reason: str, returncode: int) -> None:
        super().__init__(f"memfs ctl {' '.join(words)}: {reason}")
        self.words = list(words)
        self.reason = reason
        self.returncode = returncode


def _escape(path: str) -> str:
    """`path` as /proc/self/mountinfo spells it (octal escapes for space, tab, newline, backslash)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _device(mountpoint: Path) -> str | None:
    """MAJOR:MINOR of the mount at `mountpoint` (the minor is its fusectl connection), or None."""
    target = _escape(str(mountpoint))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == target:
                return fields[2]
    return None


def is_mounted(mountpoint: Path) -> bool:
    """Whether something is mounted at `mountpoint`, from mountinfo: never touches the mount."""
    return _device(mountpoint) is not None


def _wait(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.02)
    return True


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run(capture_output, text), but a child that ignores the kill after the timeout
    (stuck in a FUSE request) is abandoned after a bounded wait instead of waited for forever."""
    with subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", ""
            try:
                out, err = proc.communicate(timeout=STEP_WAIT)
            except subprocess.TimeoutExpired:
                pass
            raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _fusermount(*args: str) -> bool:
    try:
        return _run(["fusermount3", *args], timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False  # the next step, or the abort, deals with it


def unmount(mountpoint: Path) -> None:
    """Detach whatever memfs mount is at `mountpoint`, alive, dead or stuck; MemfsError if impossible."""
    for args in (("-u",), ("-u", "-z")):
        if not is_mounted(mountpoint):
            return
        if _fusermount(*args, str(mountpoint)) and _wait(lambda: not is_mounted(mountpoint), STEP_WAIT):
            return
    device = _device(mountpoint)
    if device is None:
        return
    try:  # a daemon that stopped answering: fail its pending requests so nothing stays in state D
        with open(f"/sys/fs/fuse/connections/{device.split(':')[1]}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass
    _fusermount("-u", "-z", str(mountpoint))
    if not _wait(lambda: not is_mounted(mountpoint), STEP_WAIT):
        raise MemfsError(f"{mountpoint} is still mounted after fusermount3 -u, -u -z and a fusectl abort "
                         f"(run: fusermount3 -u -z {mountpoint})")


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of PID from /proc/PID/stat, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], fields[19])


def _stop_daemon(pid: int, started: str | None) -> None:
    """Wait for the daemon to exit; SIGTERM (and SIGCONT), then SIGKILL it if it does not.

    Only while PID is still the daemon (same start time): a pid is never signalled once reused.
    """
    def gone() -> bool:
        stat = _stat(pid)
        return stat is None or stat[1] != started

    def stopped() -> bool:
        stat = _stat(pid)
        return stat is not None and stat[1] == started and stat[0] in ("T", "t")

    if started is None or _wait(lambda: gone() or stopped(), EXIT_WAIT) and gone():
        return
    for sigs in ((signal.SIGTERM, signal.SIGCONT), (signal.SIGKILL,)):
        if gone():
            return
        try:
            for sig in sigs:
                os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait(gone, EXIT_WAIT):
            return
    raise MemfsError(f"memfs daemon pid {pid} did not exit even after SIGKILL")


class MemfsMachine:
    """A mounted memfs machine. Create with `MemfsMachine.mount` (also a context manager for
    other scopes: ``with MemfsMachine.mount(iomem=...) as m:``); `close` always unmounts."""

    def __init__(self, base: Path, pid: int | None) -> None:
        self.base = base
        self.mountpoint = base / "mnt"
        self.mem = self.mountpoint / "dev" / "mem"
        self.iomem_path = self.mountpoint / "proc" / "iomem"
        self.control_path = self.mountpoint / "control"
        self.log = base / "memfs.log"
        self.pid = pid  # the daemon's
        stat = _stat(pid) if pid is not None else None
        self._started = stat[1] if stat else None

    @classmethod
    def mount(cls, machine: str | os.PathLike[str] | None = None, iomem: str | os.PathLike[str] | None = None,
              settings: Mapping[str, object] | None = None, allow_other: bool = False) -> MemfsMachine:
        """Mount a machine on a fresh temporary directory (under $TMPDIR); MemfsError says why not."""
        if machine is not None and iomem is not None:
            raise MemfsError("give machine= or iomem=, not both")
        base = Path(os.path.realpath(tempfile.mkdtemp(prefix="memfs-pytest-")))
        if allow_other:
            base.chmod(0o755)  # other users must reach the mount point
        (base / "mnt").mkdir()
        argv = [*MEMFS, "mount", str(base / "mnt"), "--log", str(base / "memfs.log")]
        if machine is not None:
            argv += ["--machine", os.fspath(machine)]
        if iomem is not None:
            argv += ["--iomem", os.fspath(iomem)]
        for key, value in (settings or {}).items():
            argv += ["--set", f"{key}={value}"]
        if allow_other:
            argv.append("--allow-other")
        try:
            done = _run(argv, MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(argv, -1, "", f"timed out after {MOUNT_TIMEOUT:.0f} s")
        found = re.search(r"daemon pid (\d+)", done.stdout)
        mounted = cls(base, int(found.group(1)) if found else None)
        if done.returncode == 0 and is_mounted(mounted.mountpoint):
            return mounted
        why = done.stderr.strip() or f"exit status {done.returncode}, nothing mounted"
        log = mounted.log.read_text(errors="replace")[-2000:] if mounted.log.exists() else ""
        try:
            mounted.close()
        except MemfsError as e:
            why += f"; cleaning up: {e}"
        raise MemfsError(f"memfs mount failed: {why}" + (f"\ndaemon log:\n{log}" if log else ""))

    def ctl(self, *words: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a control command (``ctl("virtio0", "requested-size", "2G")``); returns its result.

        A failed command raises MemfsCommandError with memfs's reason. A ``partial:`` result
        (the driver could not reach the requested size) is a result, not an error.
        """
        done = _run([*MEMFS, "ctl", str(self.mountpoint), *words], timeout)
        if done.returncode != 0:
            reason = done.stderr.strip()
            prefix = f"memfs: {' '.join(words)}: "
            raise MemfsCommandError(words, reason.removeprefix(prefix) or f"exit status {done.returncode}",
                                    done.returncode)
        return done.stdout

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a tool with dev/mem and proc/iomem bound over /dev/mem and /proc/iomem (``memfs run``).

        Output is captured as text; the return code is the tool's (128+N if killed by signal N).
        Raises subprocess.TimeoutExpired after `timeout` seconds.
        """
        return _run([*MEMFS, "run", str(self.mountpoint), "--", *argv], timeout)

    def iomem(self) -> str:
        """What the machine's /proc/iomem shows (read as root: real addresses)."""
        return self.iomem_path.read_text()

    def close(self) -> None:
        """Unmount (even a dead or stuck mount), stop the daemon, remove the temporary directory."""
        try:
            unmount(self.mountpoint)
        finally:  # a daemon that kept its mount is stopped all the same: that ends its connection
            if self.pid is not None:
                _stop_daemon(self.pid, self._started)
        shutil.rmtree(self.base, ignore_errors=True)  # only reached once nothing is mounted there

    def __enter__(self) -> MemfsMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemfsMachine(mountpoint={str(self.mountpoint)!r}, pid={self.pid})"


def _requirements() -> str | None:
    """Why this process cannot mount memfs, or None."""
    if os.geteuid() != 0:
        return (f"memfs_machine needs root (euid is {os.geteuid()}): memfs mounts with FUSE and "
                "`memfs run` uses a mount namespace; run the tests as root")
    if not os.path.exists("/dev/fuse"):
        return "memfs_machine needs /dev/fuse (load the fuse module; in a container, pass --device /dev/fuse)"
    if shutil.which("fusermount3") is None:
        return "memfs_machine needs fusermount3 (Debian: apt-get install fuse3)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


@pytest.fixture
def memfs_machine(request: pytest.FixtureRequest) -> Iterator[MemfsMachine]:
    """A machine mounted for this test (see the module docstring); always unmounted afterwards."""
    marker = request.node.get_closest_marker(MARKER)
    kwargs: dict[str, object] = dict(marker.kwargs) if marker else {}
    problems = [f"unexpected positional argument {a!r}" for a in (marker.args if marker else ())]
    problems += [f"unknown keyword {k!r}" for k in sorted(set(kwargs) - {"machine", "iomem", "settings",
                                                                        "allow_other"})]
    paths: dict[str, str | None] = {}
    for key in ("machine", "iomem"):
        value = kwargs.get(key)
        paths[key] = value if value is None or isinstance(value, str) else str(value)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            problems.append(f"{key} must be a path, got {value!r}")
    if paths["machine"] is not None and paths["iomem"] is not None:
        problems.append("give machine= or iomem=, not both")
    settings = kwargs.get("settings") or {}
    if not isinstance(settings, Mapping):
        problems.append(f"settings must be a dict of KEY: VALUE, got {settings!r}")
        settings = {}
    if problems:
        pytest.fail(f"@pytest.mark.{MARKER}: {'; '.join(problems)} (usage: {MARKER_HELP})", pytrace=False)
    why = _requirements()
    if why:
        pytest.fail(why, pytrace=False)
    try:
        machine = MemfsMachine.mount(paths["machine"], paths["iomem"], settings,
                                     allow_other=bool(kwargs.get("allow_other", False)))
    except MemfsError as e:
        raise pytest.fail.Exception(str(e), pytrace=False) from None
    try:
        yield machine
    finally:
        machine.close()
