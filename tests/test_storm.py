"""Issue 10 item 9: the storm. Workers in separate processes read, write and map plugged virtio-mem
memory through a real mount while a controller plugs, unplugs and resizes it through MOUNT/control.

Every 8-byte word the workers store is (generation << 48 | its own physical address). The
controller gives each 2 MiB subblock a generation, bumped each time it is plugged again, and
publishes over the workers' stdin which subblocks are plugged at which generation. Before a
command that takes memory away it revokes the subblocks that will go (a shadow model, the same
machine in this process, says which) and waits until every coordinated worker has acknowledged,
as a guest kernel offlines memory before virtio-mem unplugs it; the memory is published again,
at a new generation, only after the command returned. So:

* no coordinated access may fault (EFAULT, SIGBUS), and none may reach unplugged memory;
* every word read is zero or carries the subblock's current generation and its own address
  (older generation: stale data that survived an unplug; a worker's own pages must read back
  exactly what it stored, or zeros after a re-plug);
* a mapper keeps one MAP_SHARED mapping of the whole region for its lifetime, so its pages
  live through unplugs and re-plugs: revocation must reach them. Phases without plain reads
  and writes (which write back and drop every cached page themselves) keep cached and dirty
  pages alive until a command comes, and a mapper stores once more into memory it is told to
  let go of before acknowledging: that store must land before the discard;
* a prober, which waits for no one, reads pages it believes unplugged (plain reads: EFAULT;
  forked mapping children: SIGBUS). Those are the only accesses to unplugged memory: the
  device's read count must equal the audit's records of them, and its write count is 0;
* every command's result, proc/iomem and memory-devices match the shadow model's, and a failed
  command leaves the model as it was;
* every wait has a deadline; the daemon's RSS stays bounded and goes back after unplug-all.

MEMFS_STORM_SECONDS (default 20) and MEMFS_STORM_SEED change the run.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

BASE = 0x100000000
REGION = 4 << 30
SB = 2 << 20                      # subblock: the device block (2 MiB) = pageblock
NSB = REGION // SB
PAGE = 4096
WINDOW_PAGES = 16                 # workers store into the first 64 KiB of each subblock only
ADDR_MASK = (1 << 48) - 1
ZERO = bytes(PAGE)
COORDINATED = ("plain", "plain", "mapper", "mapper")
RAM_MAPS = ["--set", "arch=arm64", "--set", "STRICT_DEVMEM=n", "--set", "memhp_default_state=online_movable"]
SETTINGS = {"arch": "arm64", "STRICT_DEVMEM": "n", "memhp_default_state": "online_movable"}
PROBE_CAP = 400                   # prober reads of believed-unplugged pages (the audit keeps 1000 records)
CHILD_CAP = 20                    # prober's mapping children
DEADLINE = 10.0                   # seconds for any single wait


def pattern(gen: int, page_addr: int) -> bytes:
    top = gen << 48
    return array("Q", range(top | page_addr, top | (page_addr + PAGE), 8)).tobytes()


def subblock(addr: int) -> int:
    return (addr - BASE) // SB


# -- workers (separate processes: `python test_storm.py ROLE INDEX MEM SEED`) -------------------------


class Worker:
    """One worker process: applies the controller's messages between operations, one operation at a time."""

    def __init__(self, role: str, index: int, mem: str, seed: int) -> None:
        self.role, self.index = role, index
        self.rng = random.Random(seed)
        self.plain = os.open(mem, os.O_RDWR)
        self.sync = os.open(mem, os.O_RDWR | os.O_SYNC) if role == "mapper" else -1
        self.map = (mmap.mmap(self.sync, REGION, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=BASE)
                    if role == "mapper" else None)
        self.mem = mem
        self.plugged: list[int] = []          # published plugged subblocks
        self.pos: dict[int, int] = {}
        self.gen: dict[int, int] = {}         # the newest generation heard of, per subblock
        self.own: dict[int, int] = {}         # own page address -> generation stored there
        self.inbuf = b""
        self.stats = {"ops": 0, "writes": 0, "verified_own": 0, "span_reads": 0, "replugged_reads": 0,
                      "errors": 0, "efault": 0, "sigbus": 0, "children": [], "sigbus_children": [],
                      "last_stores": 0}
        self.errors: list[str] = []
        self.probes = 0
        self.next_child = time.monotonic() + 0.5
        self.quit = False
        self.mapped_only = False  # a phase without plain reads and writes: cached and dirty pages live long

    # -- messages ------------------------------------------------------------------------------

    def poll_messages(self) -> None:
        try:
            data = os.read(0, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.quit = True
            return
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            kind, _, rest = line.decode().partition(" ")
            if kind == "P":
                for item in rest.split():
                    s, g = map(int, item.split(":"))
                    self.gen[s] = g
                    if s not in self.pos:
                        self.pos[s] = len(self.plugged)
                        self.plugged.append(s)
            elif kind == "U":
                epoch, *subs = rest.split()
                for s in map(int, subs):
                    if self.map is not None and s in self.pos and self.rng.random() < 0.5:
                        # a last store before letting go: dirty in the page cache when the command comes
                        page = self.own_page(s)
                        self.map[page - BASE:page - BASE + PAGE] = pattern(self.gen[s], page)
                        self.stats["last_stores"] += 1
                    self._drop(s)
                os.write(1, f"A {epoch}\n".encode())
            elif kind == "M":
                self.mapped_only = rest == "1"
            elif kind == "Q":
                self.quit = True

    def _drop(self, s: int) -> None:
        i = self.pos.pop(s, None)
        if i is not None:
            last = self.plugged.pop()
            if last != s:
                self.plugged[i] = last
                self.pos[last] = i
        start = BASE + s * SB
        for p in range(WINDOW_PAGES):
            self.own.pop(start + p * PAGE, None)

    def error(self, text: str) -> None:
        self.stats["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{self.role}{self.index}: {text}")

    # -- checks --------------------------------------------------------------------------------

    def check(self, data: bytes, addr: int, how: str, exact: bytes | None = None) -> None:
        """Words of [addr, +len) in one subblock: zero or the subblock's current generation (coordinated),
        at least the newest generation heard of (prober); `exact`: the whole page must be that."""
        s = subblock(addr)
        g = self.gen.get(s, 0)
        if g >= 2:
            self.stats["replugged_reads"] += 1
        if exact is not None and data == exact:
            return
        for off in range(0, len(data), PAGE):
            chunk, page_addr = data[off:off + PAGE], addr + off
            in_window = (page_addr - BASE) % SB < WINDOW_PAGES * PAGE
            if exact is None and (chunk == ZERO or (in_window and chunk == pattern(g, page_addr))):
                continue
            for i, w in enumerate(array("Q", chunk)):
                a = page_addr + 8 * i
                want = None if exact is None else int.from_bytes(exact[off + 8 * i:off + 8 * i + 8], "little")
                if w == want or (w == 0 and want is None):
                    continue
                tag = w >> 48
                if w == 0:
                    kind = "lost write"
                elif (w & ADDR_MASK) != a or not in_window:
                    kind = "corrupt"
                elif tag < g:
                    kind = "stale"
                elif self.role == "prober" and want is None:
                    continue   # a newer generation than the prober heard of yet
                else:
                    kind = "wrong generation"
                self.error(f"{kind}: {how} at {a:#x} (subblock {s}, generation {g}) read {w:#018x}, "
                           f"expected {'0 or ' if want is None else ''}{(g << 48 | a) if want is None else want:#018x}")
                return

    # -- operations ----------------------------------------------------------------------------

    def own_page(self, s: int) -> int:
        mine = [p for p in range(WINDOW_PAGES) if p % len(COORDINATED) == self.index]
        return BASE + s * SB + self.rng.choice(mine) * PAGE

    def step(self) -> None:
        if self.role == "prober":
            return self.probe()
        if not self.plugged or (self.mapped_only and self.map is None):
            time.sleep(0.002)
            return
        plain_ok = not self.mapped_only
        s = self.rng.choice(self.plugged)
        g = self.gen[s]
        r = self.rng.random()
        self.stats["ops"] += 1
        try:
            if r < 0.3:                                   # store into an own page
                page = self.own_page(s)
                data = pattern(g, page)
                if self.map is not None and (not plain_ok or self.rng.random() < 0.8):
                    self.map[page - BASE:page - BASE + PAGE] = data
                else:
                    if os.pwrite(self.plain, data, page) != PAGE:
                        self.error(f"short write at {page:#x}")
                self.own[page] = g
                self.stats["writes"] += 1
            elif r < 0.6:                                 # an own page reads back exactly
                page = self.own_page(s)
                expect = pattern(g, page) if self.own.get(page) == g else ZERO
                if self.map is not None and (not plain_ok or self.rng.random() < 0.7):
                    data = self.map[page - BASE:page - BASE + PAGE]
                    how = "mapping read of own page"
                else:
                    data = os.pread(self.plain, PAGE, page)
                    how = "read of own page"
                self.check(data, page, how, exact=expect)
                self.stats["verified_own"] += 1
            else:                                         # any span of the subblock: zero or this generation
                pages = self.rng.choice((1, 1, 2, 4, 16))
                first = self.rng.choice((0, self.rng.randrange(WINDOW_PAGES), self.rng.randrange(SB // PAGE - pages)))
                first = min(first, SB // PAGE - pages)
                addr = BASE + s * SB + first * PAGE
                if self.map is not None:
                    if self.rng.random() < 0.5:
                        data, how = self.map[addr - BASE:addr - BASE + pages * PAGE], "mapping read"
                    else:
                        data, how = os.pread(self.sync, pages * PAGE, addr), "O_SYNC read"
                else:
                    data, how = os.pread(self.plain, pages * PAGE, addr), "read"
                if len(data) != pages * PAGE:
                    self.error(f"short {how} at {addr:#x}: {len(data)} of {pages * PAGE}")
                self.check(data, addr, how)
                self.stats["span_reads"] += 1
        except OSError as e:
            self.error(f"coordinated access to published-plugged subblock {s} failed: "
                       f"{errno.errorcode.get(e.errno, e.errno)}")

    def probe(self) -> None:
        """Uncoordinated: pages believed plugged (validated) and believed unplugged (EFAULT expected)."""
        time.sleep(0.003)
        child_due = time.monotonic() > self.next_child and len(self.stats["children"]) < CHILD_CAP
        if self.mapped_only and not child_due:
            return
        unplugged = child_due or (self.rng.random() < 0.4 and self.probes < PROBE_CAP)
        if unplugged:
            s = self.rng.randrange(NSB)
            if s in self.pos:
                return
        elif self.plugged:
            s = self.rng.choice(self.plugged)
        else:
            return
        page = BASE + s * SB + self.rng.randrange(WINDOW_PAGES) * PAGE
        self.stats["ops"] += 1
        if child_due:
            self.next_child = time.monotonic() + 0.4
            return self.map_child(page)
        self.probes += unplugged
        try:
            data = os.pread(self.plain, PAGE, page)
        except OSError as e:
            if e.errno != errno.EFAULT:
                self.error(f"read of {page:#x} failed with {errno.errorcode.get(e.errno, e.errno)}, not EFAULT")
            self.stats["efault"] += 1
            return
        self.check(data, page, "probe read")

    def map_child(self, page: int) -> None:
        """A forked child maps the page and reads a word: SIGBUS where unplugged, else a valid word."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                fd = os.open(self.mem, os.O_RDWR | os.O_SYNC)
                m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
                os.write(w, m[:PAGE])
            finally:
                os._exit(0)
        os.close(w)
        self.stats["children"].append(pid)
        deadline = time.monotonic() + DEADLINE
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                self.error(f"mapping child reading {page:#x} hung for {DEADLINE} s")
                os.close(r)
                return
            time.sleep(0.002)
        data = b""
        while chunk := os.read(r, PAGE):
            data += chunk
        os.close(r)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS:
            self.stats["sigbus"] += 1
            self.stats["sigbus_children"].append(pid)
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and len(data) == PAGE:
            self.check(data, page, "probe mapping read")
        else:
            self.error(f"mapping child reading {page:#x} ended with status {status:#x} after {len(data)} bytes")

    def run(self) -> None:
        os.set_blocking(0, False)
        while not self.quit:
            self.poll_messages()
            if not self.quit:
                self.step()
        self.stats["error_texts"] = self.errors
        os.write(1, ("R " + json.dumps(self.stats) + "\n").encode())


# -- the controller ----------------------------------------------------------------------------------


def call_with_deadline(fn, what: str, seconds: float = DEADLINE):
    """fn() in a daemon thread: its result, its exception, or AssertionError if the mount hangs."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"{what} did not return within {seconds} s: the mount hangs"
    ok, value = box[0]
    if not ok:
        raise value
    return value


class Shadow:
    """The same machine in this process: which subblocks a command takes away or plugs, and what it answers."""

    def __init__(self) -> None:
        from memfs.control import Control
        from memfs.loader import load_machine
        self.machine = load_machine(settings=SETTINGS)
        self.control = Control(self.machine)
        self.v = self.machine.virtio["virtio0"]
        self.discarded: set[int] = set()
        memory = self.v.device.memory
        discard = memory.discard

        def recording(offset: int, length: int) -> None:
            self.discarded.update(range(offset // SB, -(-(offset + length) // SB)))
            discard(offset, length)

        memory.discard = recording

    def plugged(self) -> set[int]:
        return {subblock(a) for s, e in self.v.driver.plugged_ranges() for a in range(s, e, SB)}

    def state(self) -> tuple:
        d, hp = self.v.device, self.machine.hotplug
        return (self.iomem(), d.requested_size, d.plugged_size, d.usable_region_size,
                tuple(self.v.driver.plugged_ranges()), tuple((b, hp.block(b).state) for b in sorted(hp.blocks)))

    def execute(self, command: bytes) -> tuple[int, str]:
        """The model's answer; a failed command must leave the model as it was."""
        from memfs.control import ControlError
        before = self.state()
        try:
            return 0, self.control.execute(command)
        except ControlError as e:
            assert self.state() == before, f"the failed command {command!r} ({e}) changed the model"
            return e.errno, e.result()

    def devices(self) -> str:
        from memfs.status import memory_devices
        return memory_devices(self.machine)

    def iomem(self) -> str:
        from memfs.kernel.iomem import render
        return render(self.machine.tree, True)


def daemon_pid(mnt: Path) -> int:
    out = subprocess.run(["pgrep", "-f", f"memfs mount {mnt} "], capture_output=True, text=True, timeout=10).stdout
    pids = out.split()
    assert len(pids) == 1, f"expected one daemon for {mnt}, found {pids}"
    return int(pids[0])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


class Storm:
    def __init__(self, mnt: Path, seed: int) -> None:
        self.mnt = mnt
        self.rng = random.Random(seed)
        self.seed = seed
        self.shadow = Shadow()
        self.gen = [0] * NSB
        self.epoch = 0
        self.procs: list[subprocess.Popen] = []
        self.roles: list[str] = []
        self.lines: dict[int, list[str]] = {}
        self.partial: dict[int, bytes] = {}
        self.acked: dict[int, int] = {}
        self.reports: dict[int, dict] = {}
        self.control = os.open(mnt / "control", os.O_RDWR)
        self.counts = {"commands": 0, "failed": 0, "revocations": 0, "revoked_subblocks": 0, "replugged": 0}
        self.trace: list[str] = []
        self.stopped = False   # the workers were told to quit: nobody to tell or wait for

    # -- workers ---------------------------------------------------------------------------------

    def start(self) -> None:
        mem = str(self.mnt / "dev/mem")
        for i, role in enumerate((*COORDINATED, "prober")):
            p = subprocess.Popen([sys.executable, __file__, role, str(i), mem, str(self.seed * 100 + i)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.set_blocking(p.stdin.fileno(), False)
            self.procs.append(p)
            self.roles.append(role)
            self.partial[i] = b""
            self.acked[i] = 0

    def send(self, text: str) -> None:
        if self.stopped:
            return
        data = text.encode()
        for i, p in enumerate(self.procs):
            view, deadline = memoryview(data), time.monotonic() + DEADLINE
            while view:
                try:
                    view = view[os.write(p.stdin.fileno(), view):]
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"worker {i} ({self.roles[i]}) stopped reading its messages"
                    self.pump(0.01)

    def pump(self, timeout: float) -> None:
        """Read whatever the workers said: acknowledgements and final reports."""
        fds = {p.stdout.fileno(): i for i, p in enumerate(self.procs) if p.stdout and i not in self.reports}
        if not fds:
            return
        ready, _, _ = select.select(list(fds), [], [], timeout)
        for fd in ready:
            i = fds[fd]
            data = os.read(fd, 1 << 16)
            if not data:
                self.assert_alive(i)
                continue
            self.partial[i] += data
            *lines, self.partial[i] = self.partial[i].split(b"\n")
            for line in lines:
                kind, _, rest = line.decode().partition(" ")
                if kind == "A":
                    self.acked[i] = max(self.acked[i], int(rest))
                elif kind == "R":
                    self.reports[i] = json.loads(rest)

    def assert_alive(self, i: int) -> None:
        p = self.procs[i]
        if i not in self.reports and p.poll() is not None:
            err = p.stderr.read().decode(errors="replace")[-2000:] if p.stderr else ""
            sigbus = p.returncode == -signal.SIGBUS
            how = "SIGBUS (a coordinated access faulted)" if sigbus else f"status {p.returncode}"
            raise AssertionError(f"worker {i} ({self.roles[i]}) died: {how}\n{err}\nlast commands: {self.trace[-5:]}")

    def revoke(self, subs: set[int]) -> None:
        """Take subblocks from every worker and wait until each coordinated one has acknowledged."""
        if self.stopped:
            return
        self.epoch += 1
        self.send(f"U {self.epoch} {' '.join(map(str, sorted(subs)))}\n")
        deadline = time.monotonic() + DEADLINE
        coordinated = range(len(COORDINATED))
        while any(self.acked[i] < self.epoch for i in coordinated):
            for i in coordinated:
                self.assert_alive(i)
            assert time.monotonic() < deadline, (
                f"workers {[i for i in coordinated if self.acked[i] < self.epoch]} did not acknowledge a "
                f"revocation within {DEADLINE} s (hang?); last commands: {self.trace[-5:]}")
            self.pump(0.05)
        self.counts["revocations"] += 1
        self.counts["revoked_subblocks"] += len(subs)

    def publish(self, subs: set[int]) -> None:
        for s in subs:
            self.gen[s] += 1
        if subs:
            self.send("P " + " ".join(f"{s}:{self.gen[s]}" for s in sorted(subs)) + "\n")

    # -- commands ----------------------------------------------------------------------------------

    def command(self) -> bytes:
        rng, v = self.rng, self.shadow.v
        plugged = self.shadow.plugged()
        usable = v.device.usable_region_size // SB
        r = rng.random()
        if r < 0.32:
            free = [s for s in range(usable) if s not in plugged]
            if free:
                s = rng.choice(free)
                n = rng.choice((1, 1, 2, 3, 8, 64))
                words = rng.choice((f"{n * 2}M", hex(n * SB), str(n * SB), f"{n * 2}MiB"))
                return f"virtio0 plug {BASE + s * SB:#x} {words}".encode()
            r = 0.5
        if r < 0.64 and plugged:
            s = rng.choice(sorted(plugged))
            n = rng.choice((1, 1, 2, 4, 8, 64))
            addr = rng.choice((hex(BASE + s * SB), str(BASE + s * SB)))
            return f"virtio0 unplug {addr} {n * 2}M".encode()
        if r < 0.9:
            size = v.device.plugged_size + rng.randint(-64, 64) * SB if rng.random() < 0.7 else \
                rng.randrange(0, REGION + 1, 128 << 20)
            size = max(0, min(REGION, size))
            return f"virtio0 requested-size {rng.choice((f'{size >> 20}M', hex(size), str(size)))}".encode()
        if r < 0.93:
            return b"virtio0 unplug-all"
        return rng.choice([
            f"virtio0 plug {BASE + 4096:#x} 2M", f"virtio0 plug {BASE:#x} 3M", f"virtio0 unplug {BASE - SB:#x} 2M",
            f"virtio0 unplug {BASE + REGION:#x} 2M", "virtio9 plug 0x100000000 2M", "virtio0 requested-size 5G",
            "virtio0 requested-size 1M", "virtio0 frobnicate", "virtio0 plug 0x100000000", "   ", "help me",
            f"virtio0 plug {BASE + REGION - SB:#x} 4M", "virtio0 requested-size -2M",
        ]).encode() + b"\n"

    def real(self, command: bytes) -> tuple[int, str]:
        def run() -> tuple[int, str]:
            try:
                os.write(self.control, command)
                err = 0
            except OSError as e:
                err = e.errno
            return err, os.pread(self.control, 1 << 16, 0).decode()
        return call_with_deadline(run, f"the control write {command!r}")

    def read(self, name: str) -> str:
        return call_with_deadline(lambda: (self.mnt / name).read_text(), f"reading {name}")

    def step(self, command: bytes) -> None:
        before = self.shadow.plugged()
        self.shadow.discarded.clear()
        expect = self.shadow.execute(command)
        after = self.shadow.plugged()
        churned = before & after & self.shadow.discarded
        taken = (before - after) | churned
        self.trace.append(f"{command!r} -> {expect[1].splitlines()[0] if expect[1] else expect[0]}")
        if taken:
            self.revoke(taken)
        got = self.real(command)
        assert got == expect, f"after {self.trace[-6:-1]}: {command!r} answered {got}, the model {expect}"
        self.counts["commands"] += 1
        self.counts["failed"] += bool(expect[0])
        # a failed command changed nothing, a successful one exactly what the model did
        assert self.read("proc/iomem") == self.shadow.iomem(), f"proc/iomem differs from the model after {command!r}"
        assert self.read("memory-devices") == self.shadow.devices(), f"memory-devices differs after {command!r}"
        fresh = (after - before) | churned
        self.counts["replugged"] += sum(1 for s in fresh if self.gen[s])
        self.publish(fresh)


def test_storm(mount):
    seed = int(os.environ.get("MEMFS_STORM_SEED", "0")) or random.randrange(1, 1 << 30)
    seconds = float(os.environ.get("MEMFS_STORM_SECONDS", "20"))
    mnt = mount(*RAM_MAPS)
    pid = daemon_pid(mnt)
    storm = Storm(mnt, seed)
    where = f"(seed {seed}: MEMFS_STORM_SEED={seed} repeats this run)"
    assert storm.read("proc/iomem") == storm.shadow.iomem(), where
    baseline = rss_kib(pid)
    peak = baseline
    try:
        storm.start()
        storm.publish(storm.shadow.plugged())        # 1 GiB plugged at boot: generation 1
        end = time.monotonic() + seconds
        next_rss = next_phase = 0.0
        mapped_only = False
        while time.monotonic() < end:
            if time.monotonic() > next_phase:   # alternate: everything / mappings only
                mapped_only, next_phase = not mapped_only, time.monotonic() + storm.rng.uniform(0.5, 2.5)
                storm.send(f"M {int(mapped_only)}\n")
            storm.step(storm.command())
            storm.pump(storm.rng.choice((0, 0.01, 0.03)))
            for i in range(len(storm.procs)):
                storm.assert_alive(i)
            if time.monotonic() > next_rss:
                peak, next_rss = max(peak, rss_kib(pid)), time.monotonic() + 0.25
        storm.send("Q\n")
        storm.stopped = True
        deadline = time.monotonic() + DEADLINE
        while len(storm.reports) < len(storm.procs):
            assert time.monotonic() < deadline, f"workers {set(range(len(storm.procs))) - set(storm.reports)} " \
                                                f"did not finish within {DEADLINE} s {where}"
            for i in range(len(storm.procs)):
                storm.assert_alive(i)
            storm.pump(0.05)
        for p in storm.procs:
            p.wait(timeout=DEADLINE)
        peak = max(peak, rss_kib(pid))

        reports = storm.reports
        audit = storm.read("audit")
        lines = audit.splitlines()
        summary = next(line for line in lines if "accesses to unplugged memory" in line)
        errors = [text for r in reports.values() for text in r["error_texts"]]
        assert not errors, f"{sum(r['errors'] for r in reports.values())} errors {where}; {summary}:\n" + \
            "\n".join(errors)

        # what the workers did: enough to mean something
        coordinated = [reports[i] for i in range(len(COORDINATED))]
        assert storm.counts["commands"] >= 50 and storm.counts["revocations"] >= 10, (storm.counts, where)
        assert storm.counts["replugged"] >= 10, (storm.counts, where)
        assert all(r["writes"] >= 20 and r["verified_own"] >= 20 and r["span_reads"] >= 20 for r in coordinated), \
            (coordinated, where)
        assert sum(r["replugged_reads"] for r in coordinated) >= 20, (coordinated, where)
        assert all(r["last_stores"] >= 10 for r, role in zip(coordinated, COORDINATED) if role == "mapper"), \
            (coordinated, where)
        prober = reports[len(COORDINATED)]
        assert prober["efault"] >= 10 and prober["sigbus"] >= 3, (prober, where)

        # accesses to unplugged memory: only the prober's, each one in the audit; no store ever
        total = int(lines[0].split()[1])
        assert total <= 1000, f"the audit dropped records: {lines[0]}"
        records = [line for line in lines[1:] if not line.startswith("#")]
        assert len(records) == total
        reads, writes = (int(x) for x in summary.replace(",", "").split()[-3::2])
        assert writes == 0, f"{writes} stores reached unplugged memory {where}: {summary}"
        pids = {int(field[4:]) for line in records for field in line.split() if field.startswith("pid=")}
        workers = {p.pid for p in storm.procs[:len(COORDINATED)]}
        assert not pids & workers, f"coordinated workers were refused {where}:\n" + "\n".join(records[:10])
        assert all(" read [" in line or " map-read [" in line for line in records), "\n".join(records[:10])
        device_reads = [line for line in records if "guest read of unplugged" in line]
        assert reads == len(device_reads), f"device counted {reads} reads, the audit has {len(device_reads)}"
        # a plain read of unplugged memory fails with EFAULT either way: refused by the device (counted)
        # inside an added memory block, by valid_phys_addr_range (arm64: memblock) outside one (not counted)
        by_prober = [line for line in records if f"pid={storm.procs[-1].pid} " in line]
        assert len(by_prober) == prober["efault"], (len(by_prober), prober["efault"], where)
        assert all("guest read of unplugged" in line or "valid_phys_addr_range" in line for line in by_prober), \
            "\n".join(by_prober[:10])
        # every SIGBUS was a refused read; a child whose page was plugged in between may have a refusal too
        child_pids = pids - {storm.procs[-1].pid}
        assert set(prober["sigbus_children"]) <= child_pids <= set(prober["children"]), \
            (child_pids, prober["sigbus_children"], where)

        # memory the storm stored is at most 64 KiB a subblock: 128 MiB
        assert peak - baseline <= (128 + 96) * 1024, f"daemon RSS grew from {baseline} to {peak} KiB {where}"
        # store 64 MiB more, then unplug everything: the RSS goes back
        storm.step(b"virtio0 requested-size 4G")
        fd = os.open(mnt / "dev/mem", os.O_RDWR)
        try:
            for i in range(64):
                call_with_deadline(lambda: os.pwrite(fd, b"\xa5" * (1 << 20), BASE + REGION - (i + 1) * (1 << 20)),
                                   "a write to dev/mem")
        finally:
            os.close(fd)
        full = rss_kib(pid)
        storm.step(b"virtio0 unplug-all")
        time.sleep(0.1)
        empty = rss_kib(pid)
        assert full - empty >= 60 * 1024 and empty - baseline <= 32 * 1024, (baseline, full, empty, where)
        assert storm.read("proc/iomem") == storm.shadow.iomem()
    finally:
        for p in storm.procs:
            if p.poll() is None:
                p.kill()
        for p in storm.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # stuck on the mount: the fixture's unmount aborts the connection
        os.close(storm.control)
    done = [{k: r[k] for k in ("ops", "writes", "verified_own", "span_reads", "replugged_reads", "last_stores")}
            for r in coordinated]
    print(f"storm {where}: {storm.counts}, daemon RSS {baseline} -> peak {peak} KiB, "
          f"audit reads {reads} writes {writes}; prober {prober['efault']} EFAULT, {prober['sigbus']} SIGBUS; "
          f"workers {done}")


if __name__ == "__main__":
    Worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])).run()
