"""Benchmarks of memfs next to two references measured in the same run; prints a table, writes JSON.

The references serve one file from an anonymous mmap and do nothing else: a C FUSE low-level
server (scripts/bench_c/server.c, multi-threaded, built here with gcc and `pkg-config fuse3`,
cached by source hash) and a bare pyfuse3 server (scripts/bench_ref.py). Each runs in FUSE
direct_io mode (as memfs's plain opens of dev/mem) and in page-cache mode (as memfs's O_SYNC
opens, which MAP_SHARED needs). After an untimed warm-up round, rounds alternate memfs and the
references (the order rotates), medians are reported, and the targets of issue 13 are shown
next to the ratios as met / not met. This is informational only: nothing here fails, the exit
status is 0 whatever the numbers.

Needs root (dev/mem wants CAP_SYS_RAWIO; memfs run, readahead settings). Every mount lives in a
temporary directory and is unmounted in a `finally` (fusermount3 -u, then -u -z); every wait has
a deadline; a measurement that overruns its deadline has its FUSE connections aborted.

  scripts/bench                  # full run, a few minutes on 2 cores
  scripts/bench --quick          # smoke run, tiny sizes, 1 round, under a minute
  scripts/bench --reps 7 --json out.json --only main,scale
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
C_SOURCE = SCRIPTS / "bench_c" / "server.c"
C_PREADS = SCRIPTS / "bench_c" / "preads.c"
PY_REF = SCRIPTS / "bench_ref.py"
DEFAULT_IOMEM = REPO / "memfs" / "data" / "qemu-q35-2G.iomem"

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
PAGE = 4096

# Where the workloads read on the default machine (memfs/data/qemu-q35-2G.iomem):
RAM_BASE = 0x10000000     # inside "00100000-7ffdffff : System RAM"
WINDOW_BASE = 0x80000000  # "80000000-afffffff : PCI Bus 0000:00": not RAM, not busy: allowed, mappable
# On the generated N-resource machines: PCI functions (BARs, not busy) packed from here.
SCALE_BASE = 0x80000000
SCALE_SPAN = 256 * MIB
# The bare pyfuse3 direct_io server refuses reads from here (EPERM): the refusal benchmark's floor.
REF_REFUSE_FROM = 1 * GIB
# The virtio-mem machine of the resize and RSS measurements: a 1 TiB region above the boot layout.
VIRTIO_ADDR = 1 << 40
VIRTIO_REGION = 1 * TIB

MOUNT_DEADLINE = 60.0     # a mount (memfs parses the machine first) must be ready by then
UNMOUNT_DEADLINE = 10.0
STEP_DEADLINE = 300.0     # any single timed step; its FUSE connections are aborted after it

SERVERS = ("memfs", "C", "pyfuse3")


@dataclass
class Params:
    reps: int
    seq_mib: int
    random_reads: int
    mmap_mib: int
    refused_reads: int
    dump_seconds: float
    memdump_seconds: float
    scale_reads: int
    scale_resources: tuple[int, int]
    iomem_resources: tuple[int, int]
    rss_write_mib: int


FULL = Params(reps=5, seq_mib=256, random_reads=5000, mmap_mib=32, refused_reads=5000, dump_seconds=120,
              memdump_seconds=20, scale_reads=5000, scale_resources=(10, 10_000),
              iomem_resources=(10_000, 100_000), rss_write_mib=1024)
QUICK = Params(reps=1, seq_mib=16, random_reads=300, mmap_mib=2, refused_reads=300, dump_seconds=2,
               memdump_seconds=2, scale_reads=300, scale_resources=(10, 10_000),
               iomem_resources=(10_000, 100_000), rss_write_mib=64)

PHASES = ("main", "tools", "scale", "resize", "rss")

_t0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- mounts -------------------------------------------------------------------------------------

def _mountinfo_path(path: str) -> str:
    p = os.path.abspath(path)
    for ch, esc in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        p = p.replace(ch, esc)
    return p


def mountinfo(path: str) -> list[str] | None:
    """The mountinfo fields of what is mounted at `path` (the top one), or None. Never stats it."""
    target = _mountinfo_path(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == target:
                found = fields
    return found


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "X", "?")


@dataclass
class Mount:
    label: str
    path: str
    proc: subprocess.Popen | None = None  # a reference server (our child)
    pid: int | None = None                # a memfs daemon (not our child: memfs mount forks it)
    log_path: str | None = None

    def server_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.pid

    def conn(self) -> str | None:
        info = mountinfo(self.path)
        return info[2].split(":")[1] if info else None


class Mounts:
    """Every mount of the run; all of them are unmounted by close(), whatever happened."""

    def __init__(self, work: str, memfs: list[str]) -> None:
        self.work = work
        self.memfs = memfs
        self.all: list[Mount] = []

    def _dir(self, name: str) -> str:
        path = os.path.join(self.work, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _wait_mounted(self, m: Mount, deadline: float) -> None:
        end = time.monotonic() + deadline
        while mountinfo(m.path) is None:
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"{m.label}: server exited with status {m.proc.returncode} before mounting")
            if time.monotonic() > end:
                raise RuntimeError(f"{m.label}: not mounted after {deadline:.0f}s")
            time.sleep(0.02)

    def reference(self, label: str, name: str, argv: Callable[[str], list[str]]) -> Mount:
        """Start a reference server, `argv(mountpoint)`, in the foreground; wait for its mount."""
        m = Mount(label, self._dir(name))
        m.log_path = os.path.join(self.work, f"{name}.log")
        with open(m.log_path, "w") as out:
            m.proc = subprocess.Popen(argv(m.path), stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.work)
        self.all.append(m)
        self._wait_mounted(m, MOUNT_DEADLINE)
        no_readahead(m)
        return m

    def memfs_mount(self, label: str, name: str, args: list[str]) -> Mount:
        m = Mount(label, self._dir(name))
        m.log_path = os.path.join(self.work, f"{name}.log")
        self.all.append(m)
        try:
            done = subprocess.run(self.memfs + ["mount", m.path, "--log", m.log_path] + args, cwd=self.work,
                                  capture_output=True, text=True, timeout=MOUNT_DEADLINE, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{label}: memfs mount did not return within {MOUNT_DEADLINE:.0f}s") from None
        found = re.search(r"daemon pid (\d+)", done.stdout)
        m.pid = int(found.group(1)) if found else _find_daemon(m.path)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise RuntimeError(f"{label}: memfs mount failed (status {done.returncode}): {lines[-1]}")
        self._wait_mounted(m, MOUNT_DEADLINE)
        return m

    def unmount(self, m: Mount) -> None:
        if m not in self.all:
            return
        self.all.remove(m)
        for extra in ([], ["-z"]):
            if mountinfo(m.path) is None:
                break
            try:
                subprocess.run(["fusermount3", "-u", *extra, m.path], capture_output=True, timeout=UNMOUNT_DEADLINE)
            except subprocess.TimeoutExpired:
                pass
        if mountinfo(m.path) is not None:
            log(f"{m.label}: still mounted at {m.path} after fusermount3 -u -z")
        pid = m.server_pid()
        if pid is None:
            return
        for sig, wait in ((None, UNMOUNT_DEADLINE), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                log(f"{m.label}: server pid {pid} still running after the unmount: sending {sig.name}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if (m.proc.poll() is not None) if m.proc is not None else not _alive(pid):
                    return
                time.sleep(0.05)
        log(f"{m.label}: server pid {pid} did not exit")

    def close(self) -> None:
        for m in list(reversed(self.all)):
            try:
                self.unmount(m)
            except Exception as e:  # keep unmounting the others
                log(f"{m.label}: unmount failed: {e}")


def _find_daemon(path: str) -> int | None:
    """The memfs daemon serving `path`, by its command line (memfs mount ... PATH ...)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and os.fsencode(path) in argv and int(pid) != os.getpid():
            return int(pid)
    return None


def no_readahead(m: Mount) -> None:
    """Readahead off on a reference mount, as memfs sets it on its own: one fault, one page."""
    info = mountinfo(m.path)
    if info is None:
        return
    try:
        with open(f"/sys/class/bdi/{info[2]}/read_ahead_kb", "w") as f:
            f.write("0")
    except OSError as e:
        log(f"{m.label}: could not turn readahead off: {e}")


def abort_connection(m: Mount) -> None:
    conn = m.conn()
    if conn is None:
        return
    with contextlib.suppress(OSError):
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")


@contextlib.contextmanager
def deadline(seconds: float, mounts: list[Mount], what: str) -> Iterator[None]:
    """Abort the FUSE connections of `mounts` if the block is still running after `seconds`:
    whatever is blocked in them returns ENOTCONN instead of hanging the run."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        log(f"{what}: still running after {seconds:.0f}s: aborting the FUSE connection(s) of "
            + ", ".join(m.label for m in mounts))
        for m in mounts:
            abort_connection(m)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as e:
        if fired.is_set():
            raise TimeoutError(f"{what}: over the {seconds:.0f}s deadline ({e})") from e
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise TimeoutError(f"{what}: over the {seconds:.0f}s deadline")


# -- the C reference ---------------------------------------------------------------------------

def build_c(source: Path, fuse: bool) -> str:
    """Compile a C source of scripts/bench_c once per source (and compiler, libfuse) version."""
    src = source.read_bytes()
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                           check=True, timeout=30).stdout.split() if fuse else []
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True,
                         timeout=30).stdout.splitlines()[0]
    key = hashlib.sha256(src + " ".join(flags).encode() + gcc.encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "memfs-bench-build" / key
    exe = out_dir / f"memfs-bench-{source.stem}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return str(exe)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".build-{os.getpid()}"
    done = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(source), *flags],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"gcc failed:\n{done.stderr.strip()}")
    os.replace(tmp, exe)
    log(f"built {exe}")
    return str(exe)


# -- workloads (each returns seconds, or raises) -----------------------------------------------

def fill(path: str, offset: int, size: int) -> None:
    """Write pseudo-random data, so that reads copy real pages (not the zero page)."""
    chunk = random.Random(7).randbytes(MIB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for pos in range(offset, offset + size, MIB):
            if os.pwrite(fd, chunk, pos) != MIB:
                raise OSError(errno.EIO, f"short write at {pos:#x}")
    finally:
        os.close(fd)


def seq_dd(path: str, offset: int, size_mib: int) -> float:
    """dd bs=1M, as a user would run it; the time is dd's own."""
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={size_mib}", f"skip={offset}",
                           "iflag=skip_bytes"], capture_output=True, text=True, timeout=STEP_DEADLINE)
    if done.returncode != 0:
        raise RuntimeError(f"dd: {done.stderr.strip()}")
    found = re.search(r"^(\d+) bytes.* copied, ([0-9.e-]+) s", done.stderr, re.M)
    if not found or int(found.group(1)) != size_mib * MIB:
        raise RuntimeError(f"dd copied less than {size_mib} MiB: {done.stderr.strip()}")
    return float(found.group(2))


def offsets(base: int, span: int, count: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [base + rng.randrange(span // PAGE) * PAGE for _ in range(count)]


def preads(path: str, offs: list[int], expect: str = "data") -> float:
    """4 KiB preads at `offs`; expect "data" (every read complete) or "refused" (every read EPERM)."""
    fd = os.open(path, os.O_RDONLY)
    failures = collections.Counter()
    short = 0
    try:
        start = time.perf_counter()
        for off in offs:
            try:
                if len(os.pread(fd, PAGE, off)) != PAGE:
                    short += 1
            except OSError as e:
                failures[e.errno] += 1
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    _check_preads(expect, len(offs), failures, short)
    return elapsed


def preads_c(exe: str, path: str, offs: list[int], expect: str = "data") -> float:
    """preads() through the C client (scripts/bench_c/preads.c): no Python exception per failed read."""
    done = subprocess.run([exe, path], input="\n".join(map(str, offs)), capture_output=True, text=True,
                          timeout=STEP_DEADLINE)
    if done.returncode != 0:
        raise RuntimeError(f"preads: {done.stderr.strip()}")
    head, *rest = done.stdout.splitlines()
    elapsed, short = head.split()
    failures = collections.Counter({int(e): int(n) for e, n in (line.split() for line in rest)})
    _check_preads(expect, len(offs), failures, int(short))
    return float(elapsed)


def _check_preads(expect: str, count: int, failures: collections.Counter, short: int) -> None:
    if expect == "data" and (failures or short):
        raise RuntimeError(f"{sum(failures.values())} reads failed ({_errnos(failures)}), {short} short")
    if expect == "refused" and failures.get(errno.EPERM, 0) != count:
        raise RuntimeError(f"expected every read to fail EPERM; got {_errnos(failures)} and "
                           f"{count - sum(failures.values())} successful reads")


def _errnos(counter: collections.Counter) -> str:
    return ", ".join(f"{errno.errorcode.get(k, k)} x{v}" for k, v in sorted(counter.items())) or "none"


MMAP_CHILD = r"""
import mmap, os, sys, time
path, base, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
fd = os.open(path, os.O_RDONLY | os.O_SYNC)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=base)
total = 0
for i in range(0, size, 4096):
    total += m[i]
m.close()
os.close(fd)
print(time.perf_counter() - start)
"""


def mmap_faults(path: str, base: int, size: int) -> float:
    """Touch every page of a MAP_SHARED mapping of an O_SYNC open, one byte per page, in a child
    (a refused page is SIGBUS, which must not take this process and its mounts with it)."""
    done = subprocess.run([sys.executable, "-c", MMAP_CHILD, path, str(base), str(size)], capture_output=True,
                          text=True, timeout=STEP_DEADLINE)
    if done.returncode != 0:
        why = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else done.stderr.strip().splitlines()[-1:])
        raise RuntimeError(f"mmap reader failed: {why}")
    return float(done.stdout)


CTL_CHILD = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
error = ""
start = time.perf_counter()
try:
    os.write(fd, (sys.argv[2] + "\n").encode())
except OSError as e:
    error = e.strerror
elapsed = time.perf_counter() - start
result = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip().replace("\n", " | ")
os.close(fd)
print(f"{elapsed!r}\t{error}\t{result}")
"""


def control(mnt: str, command: str) -> tuple[float, str]:
    """One control command, as `memfs ctl` sends it (a write to MNT/control, then read the result);
    the time is that of the write(2) alone, which returns once the driver has converged."""
    done = subprocess.run([sys.executable, "-c", CTL_CHILD, os.path.join(mnt, "control"), command],
                          capture_output=True, text=True, timeout=STEP_DEADLINE)
    if done.returncode != 0:
        raise RuntimeError(f"control {command!r}: {done.stderr.strip()[-300:]}")
    elapsed, error, result = done.stdout.rstrip("\n").split("\t", 2)
    if error:
        raise RuntimeError(f"control {command!r} failed: {error}: {result}")
    return float(elapsed), result


def iomem_ranges(mnt: str, name_prefix: str = "System RAM") -> list[tuple[int, int]]:
    """[start, end] of every resource of MNT/proc/iomem whose name starts with `name_prefix`, merged."""
    out: list[tuple[int, int]] = []
    with open(os.path.join(mnt, "proc/iomem")) as f:
        for line in f:
            span, sep, name = line.strip().partition(" : ")
            if sep and name.startswith(name_prefix):
                lo, hi = (int(x, 16) for x in span.split("-"))
                out.append((lo, hi))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(out):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def avml_dump(mnt: str, cap: float) -> dict:
    """avml-style: 4 KiB reads over the System RAM ranges of proc/iomem, skipping what fails."""
    ranges = iomem_ranges(mnt)
    total_pages = sum((hi - lo) // PAGE + 1 for lo, hi in ranges)
    fd = os.open(os.path.join(mnt, "dev/mem"), os.O_RDONLY)
    read_bytes = pages = skipped = 0
    failures: collections.Counter = collections.Counter()
    complete = True
    start = time.perf_counter()
    try:
        for lo, hi in ranges:
            pos = lo
            while pos <= hi:
                size = min(PAGE - pos % PAGE, hi + 1 - pos)
                try:
                    read_bytes += len(os.pread(fd, size, pos))
                    pages += 1
                except OSError as e:
                    skipped += 1
                    failures[e.errno] += 1
                pos += size
                if (pages + skipped) % 256 == 0 and time.perf_counter() - start > cap:
                    complete = False
                    break
            if not complete:
                break
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"ranges": [[hex(lo), hex(hi)] for lo, hi in ranges], "pages_in_ranges": total_pages,
            "pages_read": pages, "pages_skipped": skipped, "bytes": read_bytes, "seconds": elapsed,
            "complete": complete, "failures": {errno.errorcode.get(k, str(k)): v for k, v in failures.items()},
            "mib_per_s": read_bytes / MIB / elapsed if elapsed else 0.0}


def _descendants(root: int) -> list[tuple[int, str]]:
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        head, _, rest = stat.rpartition(")")
        pid = int(name)
        comm[pid] = head.partition("(")[2]
        parent[pid] = int(rest.split()[1])
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p:
                out.append((child, comm[child]))
                todo.append(child)
    return out


def memdump_run(memfs: list[str], mnt: str, seconds: float, work: str) -> dict:
    """memdump (Debian's) on MNT's dev/mem through `memfs run`, stopped after `seconds`.

    Bytes dumped are counted from its output. Pages skipped come from its file position: memdump
    reads a page, writes it out, and lseeks one page on past every read that fails. To stop it
    between pages, its output is no longer drained at the end: once it blocks writing a page it
    has read (/proc/PID/syscall: write), position = dumped + that page + skipped pages."""
    if shutil.which("memdump") is None:
        raise RuntimeError("memdump is not installed (Debian package memdump; scripts/bench installs it)")
    err_path = os.path.join(work, "memdump.stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(memfs + ["run", mnt, "--", "memdump"], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, cwd=work)
    counted = [0]
    first = [0.0]
    draining = threading.Event()
    draining.set()

    def reader() -> None:
        fd = proc.stdout.fileno()
        while True:
            draining.wait()
            chunk = os.read(fd, 64 * 1024)
            if not chunk:
                return
            if not counted[0]:
                first[0] = time.perf_counter()
            counted[0] += len(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    launched = time.perf_counter()
    thread.start()
    pid = None
    position = None
    pending = 0  # the page it read and is blocked writing
    try:
        end = launched + 15
        while pid is None and time.perf_counter() < end and proc.poll() is None:
            pid = next((p for p, c in _descendants(proc.pid) if c == "memdump"), None)
            time.sleep(0.02)
        if pid is None:
            raise RuntimeError(f"memdump did not start (memfs run exited {proc.poll()}): "
                               + Path(err_path).read_text().strip()[-300:])
        time.sleep(max(0.0, launched + seconds - time.perf_counter()))
        draining.clear()
        stopped = time.perf_counter()
        end = stopped + 2.0  # in a long run of failing pages it writes nothing: then stop it anywhere
        blocked = False
        while time.perf_counter() < end and not blocked:
            time.sleep(0.005)
            blocked = _blocked_writing(pid)
        os.kill(pid, signal.SIGSTOP)
        end = time.perf_counter() + 5.0
        while time.perf_counter() < end and _state(pid) not in ("T", "t"):
            time.sleep(0.005)
        pending = PAGE if blocked else 0
        position = _mem_position(pid)
        os.kill(pid, signal.SIGKILL)
        draining.set()
        proc.wait(timeout=30)
        thread.join(timeout=30)
    finally:
        draining.set()
        if proc.poll() is None:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(timeout=30)
    dumped = counted[0]
    busy = stopped - (first[0] or stopped)
    return {"seconds": seconds, "bytes": dumped, "position": position,
            "pages_skipped": None if position is None else max(0, position - dumped - pending) // PAGE,
            "mib_per_s": dumped / MIB / busy if busy > 0 else 0.0,
            "startup_s": (first[0] - launched) if first[0] else None}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _blocked_writing(pid: int) -> bool:
    """Asleep in write(2) (x86_64 syscall 1, arm64 64): its output pipe is full."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            nr = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return nr == ("64" if platform.machine() == "aarch64" else "1") and _state(pid) == "S"


def _mem_position(pid: int) -> int | None:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) < 3:
            continue
        with contextlib.suppress(OSError):
            if "mem" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("pos:"):
                            return int(line.split()[1])
    return None


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- machines --------------------------------------------------------------------------------

def scale_iomem(n: int) -> str:
    """A /proc/iomem dump with exactly `n` resources: a small boot layout and n-7 PCI functions
    (BARs: not busy, so reads in them are allowed) packed into a PCI Bus window from SCALE_BASE."""
    lines = ["00000000-00000fff : Reserved", "00001000-0009fbff : System RAM",
             "000f0000-000fffff : Reserved", "  000f0000-000fffff : System ROM",
             "00100000-7fffffff : System RAM", f"{SCALE_BASE:08x}-{SCALE_BASE + GIB - 1:08x} : PCI Bus 0000:00"]
    # RAM above 4 GiB too, so that high_memory (the end of boot RAM) lies above the PCI window:
    # x86 read(2) of /dev/mem fails EFAULT above it.
    tail = "100000000-17fffffff : System RAM"
    functions = n - len(lines) - 1
    if functions < 1 or functions * PAGE > GIB:
        raise ValueError(f"cannot lay out {n} resources")
    size = max(PAGE, SCALE_SPAN // functions // PAGE * PAGE)
    for i in range(functions):
        start = SCALE_BASE + i * size
        domain, rest = divmod(i, 1 << 16)
        bus, rest = divmod(rest, 256)
        dev, fn = divmod(rest, 8)
        lines.append(f"  {start:08x}-{start + size - 1:08x} : {domain:04x}:{bus:02x}:{dev:02x}.{fn}")
    lines.append(tail)
    return "\n".join(lines) + "\n"


def virtio_machine(strict: bool) -> str:
    """The default machine's boot layout plus one virtio-mem device with a 1 TiB region, nothing
    plugged, hot-added memory onlined movable (so the driver converges to any requested size)."""
    dump = DEFAULT_IOMEM.read_text()
    settings = 'memhp_default_state = "online_movable"\n' + ("" if strict else 'STRICT_DEVMEM = "n"\n')
    return (f'name = "bench-1T-virtio-mem"\nphys_bits = 41\niomem_text = """\n{dump}"""\n\n[settings]\n{settings}\n'
            f'[[virtio_mem]]\nid = "virtio0"\naddr = "{VIRTIO_ADDR:#x}"\nregion_size = "{VIRTIO_REGION}"\n'
            f'block_size = "2M"\nrequested_size = "0"\nmemdev = "mem0"\n')


# -- results ---------------------------------------------------------------------------------

@dataclass
class Results:
    data: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def error(self, what: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        self.errors[what] = msg
        log(f"{what}: {msg}")


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def alternate(reps: int, runs: dict[str, Callable[[], float]], what: str, mounts: dict[str, list[Mount]],
              res: Results) -> dict[str, list[float]]:
    """Run every entry once untimed (warm-up: lazily built state, first touches), then once per
    round, rotating the order each round; an entry that fails is dropped."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    failed: set[str] = set()
    labels = list(runs)
    for r in range(-1, reps):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            if label in failed:
                continue
            try:
                with deadline(STEP_DEADLINE, mounts.get(label, []), f"{what} ({label})"):
                    t = runs[label]()
                if r >= 0:
                    samples[label].append(t)
                else:
                    res.data.setdefault("warmup_s", {})[f"{what} ({label})"] = t
            except Exception as e:
                failed.add(label)
                res.error(f"{what} ({label})", e)
    return samples


# -- phases ----------------------------------------------------------------------------------

def phase_main(p: Params, mounts: Mounts, refs: dict[str, Mount], res: Results) -> None:
    """memfs next to the references: sequential, random, mmap; refused vs allowed on one mount."""
    seq_size = p.seq_mib * MIB
    direct: dict[str, tuple[Mount, str, int]] = {}     # server -> (mount, file, where to read)
    pagecache: dict[str, tuple[Mount, str, int]] = {}
    default = None
    try:  # a memfs that cannot mount still leaves the references measured
        ram = mounts.memfs_mount("memfs (STRICT_DEVMEM=n)", "memfs-ram", ["--set", "STRICT_DEVMEM=n"])
        default = mounts.memfs_mount("memfs (default settings)", "memfs-default", [])
        mem_default = os.path.join(default.path, "dev/mem")
        log(f"writing {p.seq_mib} MiB into memfs RAM at {RAM_BASE:#x}")
        with deadline(STEP_DEADLINE, [ram], "filling memfs RAM"):
            fill(os.path.join(ram.path, "dev/mem"), RAM_BASE, seq_size)
        direct["memfs"] = (ram, os.path.join(ram.path, "dev/mem"), RAM_BASE)
        pagecache["memfs"] = (default, mem_default, WINDOW_BASE)
    except Exception as e:
        res.error("memfs mounts", e)
    for name in ("C", "pyfuse3"):
        m = refs.get(f"{name} direct_io")
        if m is not None:
            try:
                with deadline(STEP_DEADLINE, [m], f"filling {m.label}"):
                    fill(os.path.join(m.path, "mem"), 0, seq_size)
                direct[name] = (m, os.path.join(m.path, "mem"), 0)
            except Exception as e:
                res.error(f"{m.label} reference", e)
        m = refs.get(f"{name} page cache")
        if m is not None:
            pagecache[name] = (m, os.path.join(m.path, "mem"), 0)

    def by_server(table, make):
        return {k: make(path, base) for k, (m, path, base) in table.items()}

    def mounts_of(table):
        return {k: [m] for k, (m, _, _) in table.items()}

    log(f"sequential: dd bs=1M, {p.seq_mib} MiB, {p.reps} round(s)")
    seq = alternate(p.reps, by_server(direct, lambda path, base: lambda: seq_dd(path, base, p.seq_mib)),
                    "sequential", mounts_of(direct), res)
    res.data["sequential_dd_1MiB"] = _server_entry(seq, "MiB/s", lambda t: p.seq_mib / t,
                                                   f"dd bs=1M count={p.seq_mib}, direct_io; memfs: boot RAM at "
                                                   f"{RAM_BASE:#x} (STRICT_DEVMEM=n), written first")

    # over the written part only, so that every server copies data
    log(f"random: {p.random_reads} 4 KiB preads over {p.seq_mib} MiB, {p.reps} round(s)")
    rnd = alternate(p.reps, by_server(direct, lambda path, base: (
        lambda offs=offsets(base, seq_size, p.random_reads): preads(path, offs))), "random", mounts_of(direct), res)
    res.data["random_4KiB_pread"] = _server_entry(rnd, "reads/s", lambda t: p.random_reads / t,
                                                  f"{p.random_reads} preads of 4 KiB at seeded random pages of "
                                                  f"{p.seq_mib} MiB, direct_io")

    log(f"mmap: page faults over {p.mmap_mib} MiB, {p.reps} round(s)")
    mm = alternate(p.reps, by_server(pagecache, lambda path, base: lambda: mmap_faults(path, base, p.mmap_mib * MIB)),
                   "mmap", mounts_of(pagecache), res)
    res.data["mmap_page_faults"] = _server_entry(mm, "pages/s", lambda t: p.mmap_mib * MIB // PAGE / t,
                                                 f"O_SYNC open, MAP_SHARED, one byte read per page of {p.mmap_mib} "
                                                 f"MiB; memfs: PCI Bus window at {WINDOW_BASE:#x} (default "
                                                 "settings); references: page-cache mode; readahead off everywhere")

    if default is not None:
        log(f"refused vs allowed: {p.refused_reads} 4 KiB preads each on the default-settings mount, "
            f"{p.reps} round(s)")
        client = build_c(C_PREADS, fuse=False)
        runs = {
            "allowed": lambda offs=offsets(WINDOW_BASE, 256 * MIB, p.refused_reads): preads_c(client, mem_default,
                                                                                              offs),
            "refused": lambda offs=offsets(RAM_BASE, 256 * MIB, p.refused_reads): preads_c(client, mem_default, offs,
                                                                                           "refused"),
        }
        where = {"allowed": [default], "refused": [default]}
        py = refs.get("pyfuse3 direct_io")
        if py is not None:   # the same client against pyfuse3's own floor: reads from REF_REFUSE_FROM fail
            py_mem = os.path.join(py.path, "mem")
            runs["pyfuse3 allowed"] = lambda offs=offsets(0, 256 * MIB, p.refused_reads): preads_c(client, py_mem,
                                                                                                   offs)
            runs["pyfuse3 refused"] = lambda offs=offsets(REF_REFUSE_FROM, 256 * MIB, p.refused_reads): preads_c(
                client, py_mem, offs, "refused")
            where |= {"pyfuse3 allowed": [py], "pyfuse3 refused": [py]}
        ra = alternate(p.reps, runs, "refused vs allowed", where, res)
    else:
        ra = {"allowed": [], "refused": []}
    res.data["refused_vs_allowed"] = {
        "what": f"{p.refused_reads} preads of 4 KiB by a C client (scripts/bench_c/preads.c) on the default "
                f"machine with default settings; allowed: "
                f"PCI Bus window at {WINDOW_BASE:#x}; refused: System RAM at {RAM_BASE:#x} (EPERM)",
        "unit": "reads/s",
        **{k: {"samples_s": v, "median_s": median(v),
               "value": p.refused_reads / median(v) if v else None} for k, v in ra.items()}}

    # memfs / reference ratios and the targets next to them
    for key in ("sequential_dd_1MiB", "random_4KiB_pread", "mmap_page_faults"):
        entry = res.data[key]
        for ref in ("C", "pyfuse3"):
            entry[f"memfs/{ref}"] = _ratio(entry["memfs"]["value"], entry[ref]["value"])
    ra_e = res.data["refused_vs_allowed"]
    ra_e["refused/allowed_time"] = _ratio(ra_e["refused"]["median_s"], ra_e["allowed"]["median_s"])
    if "pyfuse3 refused" in ra_e:
        ra_e["pyfuse3 refused/allowed_time"] = _ratio(ra_e["pyfuse3 refused"]["median_s"],
                                                      ra_e["pyfuse3 allowed"]["median_s"])


def phase_tools(p: Params, mounts: Mounts, res: Results) -> None:
    """Whole-tool workloads on the default machine with STRICT_DEVMEM=n: avml-style dump, memdump."""
    m = mounts.memfs_mount("memfs tools (STRICT_DEVMEM=n)", "memfs-tools", ["--set", "STRICT_DEVMEM=n"])
    try:
        log(f"avml-style dump of System RAM (4 KiB reads, stops after {p.dump_seconds:.0f}s)")
        try:
            with deadline(p.dump_seconds + STEP_DEADLINE, [m], "avml-style dump"):
                res.data["avml_dump"] = avml_dump(m.path, p.dump_seconds)
        except Exception as e:
            res.error("avml-style dump", e)
        log(f"memdump through memfs run for {p.memdump_seconds:.0f}s")
        try:
            with deadline(p.memdump_seconds + STEP_DEADLINE, [m], "memdump"):
                res.data["memdump"] = memdump_run(mounts.memfs, m.path, p.memdump_seconds, mounts.work)
        except Exception as e:
            res.error("memdump", e)
    finally:
        mounts.unmount(m)


def phase_scale(p: Params, mounts: Mounts, res: Results) -> None:
    """Random reads at 10 vs 10,000 resources; proc/iomem open+read at 10,000 and 100,000."""
    counts = sorted(set(p.scale_resources) | set(p.iomem_resources))
    made: dict[int, Mount] = {}
    try:
        for n in counts:
            path = os.path.join(mounts.work, f"iomem-{n}")
            Path(path).write_text(scale_iomem(n))
            log(f"mounting a machine with {n} resources")
            t = time.perf_counter()
            try:
                made[n] = mounts.memfs_mount(f"memfs {n} resources", f"memfs-scale-{n}", ["--iomem", path])
                res.data.setdefault("mount_seconds", {})[str(n)] = time.perf_counter() - t
            except Exception as e:
                res.error(f"mount with {n} resources", e)
        lo, hi = p.scale_resources
        log(f"random 4 KiB preads at {lo} vs {hi} resources, {p.reps} round(s)")
        runs = {str(n): (lambda n=n, offs=offsets(SCALE_BASE, SCALE_SPAN, p.scale_reads, seed=2):
                         preads(os.path.join(made[n].path, "dev/mem"), offs)) for n in (lo, hi) if n in made}
        sc = alternate(p.reps, runs, "scale random reads", {k: [made[int(k)]] for k in runs}, res)
        entry = {"what": f"{p.scale_reads} preads of 4 KiB at seeded random pages of the {SCALE_SPAN // MIB} MiB "
                         f"at {SCALE_BASE:#x} (PCI functions' BARs, default settings)", "unit": "reads/s"}
        for n in (lo, hi):
            v = sc.get(str(n), [])
            entry[str(n)] = {"samples_s": v, "median_s": median(v),
                             "value": p.scale_reads / median(v) if v else None}
        ratio = _ratio(entry[str(hi)]["value"], entry[str(lo)]["value"])
        entry[f"{hi}/{lo}"] = ratio
        res.data["scale_random_4KiB"] = entry

        log(f"proc/iomem open+read at {' and '.join(f'{n:,}' for n in p.iomem_resources)} resources")

        def read_iomem(n: int) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                with open(os.path.join(made[n].path, "proc/iomem"), "rb") as f:
                    text = f.read()
                elapsed = time.perf_counter() - start
                lines = text.count(b"\n")
                if lines != n:
                    raise RuntimeError(f"proc/iomem has {lines} lines, expected {n}")
                return elapsed
            return run

        rounds = max(p.reps, 5)
        io = alternate(rounds, {str(n): read_iomem(n) for n in p.iomem_resources if n in made}, "proc/iomem",
                       {str(n): [made[n]] for n in p.iomem_resources if n in made}, res)
        res.data["proc_iomem_open_read"] = {"unit": "ms", "rounds": rounds,
                                            **{str(n): {"samples_s": io.get(str(n), []),
                                                        "median_ms": median(io[str(n)]) * 1e3 if io.get(str(n))
                                                        else None} for n in p.iomem_resources}}
    finally:
        for m in made.values():
            mounts.unmount(m)


RESIZES = (("0 -> 64 GiB", "64G"), ("64 GiB -> 0", "0"), ("0 -> 1 TiB", "1T"), ("1 TiB -> 0", "0"))


def phase_resize(p: Params, mounts: Mounts, res: Results) -> None:
    path = os.path.join(mounts.work, "virtio-1T.toml")
    Path(path).write_text(virtio_machine(strict=True))
    m = mounts.memfs_mount("memfs 1 TiB virtio-mem", "memfs-resize", ["--machine", path])
    samples: dict[str, list[float]] = {label: [] for label, _ in RESIZES}
    results: dict[str, str] = {}
    try:
        log(f"requested-size 0 -> 64 GiB -> 0 -> 1 TiB -> 0, {p.reps} round(s)")
        for _ in range(p.reps):
            for label, size in RESIZES:
                with deadline(STEP_DEADLINE, [m], f"requested-size {size}"):
                    t, result = control(m.path, f"virtio0 requested-size {size}")
                samples[label].append(t)
                results[label] = result
                if not result.startswith("ok"):
                    raise RuntimeError(f"requested-size {size} did not converge: {result}")
    except Exception as e:
        res.error("resize", e)
    finally:
        res.data["resize"] = {"unit": "s", "what": "write of `virtio0 requested-size SIZE` to MNT/control (what "
                                                   "memfs ctl sends); 1 TiB region, 2 MiB blocks, online_movable",
                              **{k: {"samples_s": v, "median_s": median(v), "max_s": max(v) if v else None,
                                     "result": results.get(k)} for k, v in samples.items()}}
        mounts.unmount(m)


def phase_rss(p: Params, mounts: Mounts, res: Results) -> None:
    path = os.path.join(mounts.work, "virtio-1T-rw.toml")
    Path(path).write_text(virtio_machine(strict=False))
    m = mounts.memfs_mount("memfs 1 TiB virtio-mem (STRICT_DEVMEM=n)", "memfs-rss", ["--machine", path])
    entry: dict = {"unit": "MB", "daemon_pid": m.pid,
                   "what": f"VmRSS of the daemon: idle, after plugging and writing {p.rss_write_mib} MiB, "
                           "after requested-size 0"}
    res.data["rss"] = entry
    try:
        if m.pid is None or not _alive(m.pid):
            raise RuntimeError("daemon pid unknown (memfs mount did not print 'daemon pid N')")
        time.sleep(0.5)
        entry["idle"] = vm_rss(m.pid) / 1e6
        size = p.rss_write_mib * MIB
        log(f"RSS: plug and write {p.rss_write_mib} MiB, then unplug")
        with deadline(STEP_DEADLINE, [m], "rss"):
            entry["plug_s"], entry["plug_result"] = control(m.path, f"virtio0 requested-size {size}")
            ranges = [r for r in iomem_ranges(m.path, "System RAM") if r[0] >= VIRTIO_ADDR]
            left = size
            fd = os.open(os.path.join(m.path, "dev/mem"), os.O_WRONLY)
            chunk = random.Random(3).randbytes(MIB)
            try:
                for lo, hi in ranges:
                    for pos in range(lo, min(hi + 1, lo + left), MIB):
                        os.pwrite(fd, chunk, pos)
                        left -= MIB
            finally:
                os.close(fd)
            if left:
                raise RuntimeError(f"only {(size - left) // MIB} MiB of plugged memory found to write "
                                   f"(plug: {entry['plug_result']})")
            entry["after_write"] = vm_rss(m.pid) / 1e6
            entry["unplug_s"], entry["unplug_result"] = control(m.path, "virtio0 requested-size 0")
        time.sleep(0.5)
        entry["after_unplug"] = vm_rss(m.pid) / 1e6
    except Exception as e:
        res.error("rss", e)
    finally:
        mounts.unmount(m)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _server_entry(samples: dict[str, list[float]], unit: str, value: Callable[[float], float], what: str) -> dict:
    out: dict = {"what": what, "unit": unit}
    for k in SERVERS:
        v = samples.get(k, [])
        out[k] = {"samples_s": v, "median_s": median(v), "value": value(median(v)) if v else None}
    return out


# -- targets (issue 13) ------------------------------------------------------------------------

def targets(p: Params, d: dict) -> list[dict]:
    """Every target of the issue with what this run measured for it (None: not measured)."""
    out: list[dict] = []

    def get(*keys):
        v = d
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v

    def add(name: str, value: float | None, op: str, limit: float, shown: str, goal: str) -> None:
        met = None if value is None else value >= limit if op == ">=" else value < limit if op == "<" \
            else value <= limit
        out.append({"name": name, "value": value, "op": op, "limit": limit, "shown": shown if value is not None
                    else "-", "target": goal, "met": met})

    v = get("random_4KiB_pread", "memfs/pyfuse3")
    add("random 4 KiB reads, memfs/pyfuse3", v, ">=", 0.95, _x(v), ">= 0.95x")
    v = get("random_4KiB_pread", "memfs/C")
    add("random 4 KiB reads, memfs/C", v, ">=", 0.8, _x(v), ">= 0.8x")
    v = get("refused_vs_allowed", "refused/allowed_time")
    add("refused 4 KiB read time / allowed one", v, "<=", 1.0, _x(v), "<= 1x")
    floor = get("refused_vs_allowed", "pyfuse3 refused/allowed_time")
    add("  the same for a bare pyfuse3 server (EPERM vs data)", floor, "<=", 1.0, _x(floor), "(pyfuse3's floor)")
    v = get("sequential_dd_1MiB", "memfs/C")
    add("sequential dd bs=1M, memfs/C", v, ">=", 0.9, _x(v), ">= 0.9x")
    lo, hi = p.scale_resources
    v = get("scale_random_4KiB", f"{hi}/{lo}")
    add(f"random 4 KiB reads, {hi:,} / {lo:,} resources", v, ">=", 0.9, _x(v), ">= 0.9x")
    n = p.iomem_resources[0]
    v = get("proc_iomem_open_read", str(n), "median_ms")
    add(f"proc/iomem open+read at {n:,} resources", v, "<", 50.0, f"{v or 0:.1f} ms", "< 50 ms")
    for label, _ in RESIZES:
        v = get("resize", label, "max_s")
        add(f"requested-size {label} (slowest of {len(get('resize', label, 'samples_s') or [])})", v, "<", 1.0,
            f"{v or 0:.3f} s", "< 1 s")
    idle, after = get("rss", "idle"), get("rss", "after_unplug")
    add("daemon RSS idle, 1 TiB virtio-mem region", idle, "<", 100.0, f"{idle or 0:.1f} MB", "< 100 MB")
    v = _ratio(after, idle)
    add(f"daemon RSS after writing {p.rss_write_mib} MiB and unplugging it", v, "<=", 1.1,
        f"{after or 0:.1f} MB ({_x(v)} idle)", "<= 1.1x idle")
    return out


# -- report ----------------------------------------------------------------------------------

def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}" if abs(v) >= 1 else f"{v:.3f}"
    return f"{text} {unit}".rstrip()


def _table(rows: list[list[str]], header: list[str], numeric: bool = True) -> str:
    """Columns padded to width; the first (or, with numeric=False, every) column left-aligned."""
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [c.ljust(w) if i == 0 or not numeric else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def report(p: Params, res: Results, goals: list[dict]) -> str:
    out = []
    d = res.data
    rows = []
    for key, label in (("sequential_dd_1MiB", f"sequential dd bs=1M, {p.seq_mib} MiB"),
                       ("random_4KiB_pread", f"random 4 KiB preads x{p.random_reads}"),
                       ("mmap_page_faults", f"mmap page faults, {p.mmap_mib} MiB")):
        e = d.get(key)
        if e:
            rows.append([label, *(_fmt(e[s]["value"], e["unit"]) for s in SERVERS),
                         _x(e.get("memfs/C")), _x(e.get("memfs/pyfuse3"))])
    e = d.get("refused_vs_allowed")
    if e:
        for k in ("allowed", "refused"):
            rows.append([f"memfs default settings: {k} 4 KiB preads", _fmt(e[k]["value"], "reads/s"), "",
                         _fmt(e[f"pyfuse3 {k}"]["value"], "reads/s") if f"pyfuse3 {k}" in e else "", "", ""])
    if rows:
        out.append(_table(rows, ["memfs vs references (median)", "memfs", "C", "pyfuse3", "memfs/C",
                                 "memfs/pyfuse3"]))
    rows = []
    e = d.get("avml_dump")
    if e:
        rows.append(["avml-style dump of System RAM (STRICT_DEVMEM=n)",
                     f"{e['bytes'] / MIB:,.0f} MiB in {e['seconds']:.1f} s ({e['mib_per_s']:.1f} MiB/s), "
                     f"{e['pages_skipped']:,} pages skipped"
                     + ("" if e["complete"] else
                        f", stopped at the time limit after {e['pages_read'] + e['pages_skipped']:,} of "
                        f"{e['pages_in_ranges']:,} pages (whole dump at this rate: "
                        f"{e['seconds'] * e['pages_in_ranges'] / max(1, e['pages_read'] + e['pages_skipped']):,.0f} s)")])
    e = d.get("memdump")
    if e:
        skipped = "?" if e["pages_skipped"] is None else f"{e['pages_skipped']:,}"
        rows.append([f"memdump via memfs run, {e['seconds']:.0f} s",
                     f"{e['bytes'] / MIB:,.0f} MiB dumped ({e['mib_per_s']:.1f} MiB/s), {skipped} pages skipped"])
    e = d.get("scale_random_4KiB")
    if e:
        lo, hi = p.scale_resources
        rows.append([f"random 4 KiB preads, {lo:,} vs {hi:,} resources",
                     f"{_fmt(e[str(lo)]['value'])} vs {_fmt(e[str(hi)]['value'])} reads/s"])
    e = d.get("proc_iomem_open_read")
    if e:
        rows.append(["proc/iomem open+read", ", ".join(f"{_fmt(e[str(n)]['median_ms'], 'ms')} at {n:,} resources"
                                                       for n in p.iomem_resources if str(n) in e)])
    e = d.get("resize")
    if e:
        rows.append(["virtio-mem requested-size (median)",
                     ", ".join(f"{k}: {_fmt(e[k]['median_s'], 's')}" for k, _ in RESIZES if k in e)])
    e = d.get("rss")
    if e:
        rows.append(["daemon RSS, 1 TiB virtio-mem region",
                     f"idle {_fmt(e.get('idle'), 'MB')}, after writing {p.rss_write_mib} MiB "
                     f"{_fmt(e.get('after_write'), 'MB')}, after unplug {_fmt(e.get('after_unplug'), 'MB')}"])
    if rows:
        out.append(_table(rows, ["memfs alone", "result"], numeric=False))
    rows = [[t["name"], t["shown"], t["target"],
             "not measured" if t["met"] is None else "met" if t["met"] else "not met"] for t in goals]
    if rows:
        out.append(_table(rows, ["issue 13 targets (informational)", "measured", "target", ""]))
    if res.errors:
        out.append("errors:\n" + "\n".join(f"  {k}: {v}" for k, v in res.errors.items()))
    return "\n\n".join(out)


def _meta(args: argparse.Namespace, p: Params, memfs: list[str]) -> dict:
    def cmd(*argv: str) -> str | None:
        with contextlib.suppress(Exception):
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
        return None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "libfuse": cmd("pkg-config", "--modversion", "fuse3"), "commit": cmd("git", "rev-parse", "HEAD"),
            "worktree_dirty": bool(cmd("git", "status", "--porcelain", "--untracked-files=no")),
            "memfs_command": memfs, "PYTHONPATH": os.environ.get("PYTHONPATH"), "quick": args.quick,
            "params": p.__dict__}


# -- main ------------------------------------------------------------------------------------

def start_references(p: Params, mounts: Mounts, res: Results) -> dict[str, Mount]:
    """The C and pyfuse3 servers, each in direct_io and in page-cache mode."""
    refs: dict[str, Mount] = {}
    size = max(p.seq_mib, 256) * MIB
    mapped = p.mmap_mib * MIB
    try:
        exe = build_c(C_SOURCE, fuse=True)
        refs["C direct_io"] = mounts.reference("C direct_io", "c-direct", lambda mnt: [exe, mnt, str(size)])
        refs["C page cache"] = mounts.reference("C page cache", "c-pagecache",
                                                lambda mnt: [exe, mnt, str(mapped), "--page-cache"])
    except Exception as e:
        res.error("C reference", e)
    py = [sys.executable, str(PY_REF)]
    try:
        refs["pyfuse3 direct_io"] = mounts.reference("pyfuse3 direct_io", "py-direct", lambda mnt: py + [
            mnt, str(REF_REFUSE_FROM + 256 * MIB), "--refuse-from", str(REF_REFUSE_FROM)])
        refs["pyfuse3 page cache"] = mounts.reference("pyfuse3 page cache", "py-pagecache",
                                                      lambda mnt: py + [mnt, str(mapped), "--page-cache"])
    except Exception as e:
        res.error("pyfuse3 reference", e)
    return refs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 round (under a minute)")
    ap.add_argument("--reps", type=int, help="rounds per measurement; medians are reported (default 5, quick 1)")
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "memfs-bench.json"),
                    help="where to write the results (default: %(default)s)")
    ap.add_argument("--only", help=f"comma-separated phases to run (of {','.join(PHASES)})")
    ap.add_argument("--memfs", default=str(REPO / ".venv" / "bin" / "memfs"),
                    help="the memfs command (default: %(default)s)")
    ap.add_argument("--dump-seconds", type=float, help="time limit of the avml-style dump (default 120, quick 2)")
    ap.add_argument("--memdump-seconds", type=float, help="how long memdump runs (default 20, quick 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, machines)")
    args = ap.parse_args()
    p = Params(**(QUICK if args.quick else FULL).__dict__)
    if args.reps is not None:
        if args.reps < 1:
            ap.error("--reps must be at least 1")
        p.reps = args.reps
    if args.dump_seconds is not None:
        p.dump_seconds = args.dump_seconds
    if args.memdump_seconds is not None:
        p.memdump_seconds = args.memdump_seconds
    phases = PHASES if not args.only else tuple(x.strip() for x in args.only.split(","))
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(sorted(unknown))} (known: {', '.join(PHASES)})")
    if os.geteuid() != 0:
        print("scripts/bench: needs root (dev/mem needs CAP_SYS_RAWIO; memfs run needs unshare)", file=sys.stderr)
        return 2
    memfs = shlex.split(args.memfs)
    res = Results()
    res.data["meta"] = _meta(args, p, memfs)
    work = tempfile.mkdtemp(prefix="memfs-bench-")
    mounts = Mounts(work, memfs)
    # SIGTERM/SIGHUP unwind through the finally below like Ctrl-C does
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    interrupted = False
    try:
        for phase in phases:
            log(f"phase {phase}")
            try:
                if phase == "main":
                    refs = start_references(p, mounts, res)
                    phase_main(p, mounts, refs, res)
                    for m in refs.values():
                        mounts.unmount(m)
                else:
                    {"tools": phase_tools, "scale": phase_scale, "resize": phase_resize, "rss": phase_rss}[phase](
                        p, mounts, res)
            except Exception as e:
                res.error(f"phase {phase}", e)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: unmounting")
    finally:
        mounts.close()
        left = [line.split()[4] for line in open("/proc/self/mountinfo") if line.split()[4].startswith(work)]
        if left:
            log(f"still mounted, so {work} is kept: {', '.join(left)}")
        elif args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    goals = targets(p, res.data)
    res.data["targets"] = goals
    res.data["errors"] = res.errors
    with open(args.json, "w") as f:
        json.dump(res.data, f, indent=1)
    print()
    print(f"memfs benchmarks ({'quick, ' if args.quick else ''}medians of {p.reps} round(s) after a warm-up round; "
          f"{res.data['meta']['cpus']} CPUs, Linux {res.data['meta']['kernel']})"
          + (" -- interrupted, partial" if interrupted else ""))
    print()
    print(report(p, res, goals))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
