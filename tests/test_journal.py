"""Backing dirs in the model: the journal's lines, resuming equals the live state, crashes at every
point between logging an input and applying it, compaction, and the refusals."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs import status, sysfs
from memfs.control import Control, ControlError
from memfs.journal import Backing, Journal
from memfs.journal_file import BackingError, decode, encode, read_journal
from memfs.statedigest import state_digest
from memfs.kernel.iomem import render
from memfs.kernel.mem import BusFault
from memfs.loader import MachineError, load_machine
from memfs.physmem import FileMemory, SparseMemory

MIB, GIB = 1 << 20, 1 << 30
BASE = 0x100000000
SETTINGS = {"memhp_default_state": "online_movable"}  # the driver may plug beyond 1 GiB


# -- helpers ------------------------------------------------------------------------------------

def open_backing(path: Path, settings: dict[str, str] | None = None):
    """A backing dir and the machine it holds (resumed or new), as `memfs mount --backing-dir` does."""
    b = Backing(str(path), "/test/mnt")
    m = load_machine(settings=SETTINGS if settings is None else settings, stores=b.stores)
    b.attach(m)
    return b, m


def run(m, step) -> str:
    """One step of a script: a control command, a sysfs store, or a store to memory."""
    kind, *args = step
    try:
        if kind == "ctl":
            return Control(m).execute(args[0].encode())
        if kind == "sysfs":
            sysfs.store(m, args[0], args[1])
            return "ok"
        m.bus.store(args[0], args[1])
        return "stored"
    except (ControlError, OSError, BusFault) as e:
        return f"error: {e}"


def memory_at(m, addr: int, n: int = 4096) -> bytes:
    """What the backend holds at `addr`, plugged or not (raw store, not a guest access)."""
    for v in m.virtio.values():
        d = v.device
        if d.addr <= addr < d.addr + d.region_size:
            return d.memory.read(addr - d.addr, n)
    return m.memory.read(addr, n)


def observe(m, probes=()) -> tuple:
    """What a user of the machine can see, and the model state digest."""
    blocks = tuple((i, m.hotplug.block(i).state, m.hotplug.block(i).zone) for i in m.hotplug.blocks.ids_from(16))
    drivers = tuple((tuple(v.driver.plugged_ranges()), v.driver.offline_size) for v in m.virtio.values())
    return (state_digest(m), render(m.tree, True), status.memory_devices(m), blocks, drivers,
            m.hotplug.auto_online_blocks, tuple(memory_at(m, a) for a in probes))


def reference(steps, settings=None):
    """The same steps on a machine without a backing dir."""
    m = load_machine(settings=SETTINGS if settings is None else settings)
    for step in steps:
        run(m, step)
    return m


def journal_lines(path: Path) -> list[bytes]:
    return (path / "journal").read_bytes().splitlines(keepends=True)


# -- the journal's lines ------------------------------------------------------------------------

def test_lines_check_out_and_a_torn_tail_is_dropped():
    a, b = encode({"ctl": "virtio0 requested-size 2G"}), encode({"sysfs": "memory33/state", "value": "offline\n"})
    assert a.endswith(b"\n") and a.count(b"\n") == 1 and decode(a[:-1]) == {"ctl": "virtio0 requested-size 2G"}
    assert decode(b[:-1])["value"] == "offline\n"
    assert read_journal(b"", "j") == ([], [], 0)
    assert read_journal(a + b, "j")[1] == [decode(a[:-1]), decode(b[:-1])]
    for cut in range(1, len(b)):  # a write torn anywhere: the line is dropped, nothing else
        lines, entries, torn = read_journal(a + b[:cut], "j")
        assert lines == [a] and torn == cut
    flipped = b[:5] + bytes([b[5] ^ 1]) + b[6:]   # complete, but the CRC does not match
    assert read_journal(a + flipped, "j")[0] == [a]
    assert read_journal(a + b"\0" * 300, "j")[0] == [a]   # a power loss' zero-filled tail
    with pytest.raises(BackingError, match="line 2 is damaged but later lines are not"):
        read_journal(a + flipped + a, "j")


def test_a_torn_last_line_is_dropped_at_recovery(tmp_path):
    b, m = open_backing(tmp_path)
    run(m, ("ctl", "virtio0 requested-size 2G"))
    live = observe(m)
    b.close()
    with open(tmp_path / "journal", "ab") as f:
        f.write(encode({"ctl": "virtio0 requested-size 3G"})[:20])
    b, m = open_backing(tmp_path)
    assert observe(m) == live
    assert len(journal_lines(tmp_path)) == 1 and len(m.journal) == 1
    b.close()


def test_the_digest_sees_state_not_diagnostics_or_caches():
    m = load_machine()
    d0 = state_digest(m)
    assert d0 is not None and state_digest(load_machine()) == d0   # the same machine built twice
    v = m.virtio["virtio0"]
    v.device.violations["read"] += 1
    v.driver.log.append("info: virtio_mem virtio0: noise")
    m.tree.generation += 1
    m.bus.load(0, 4096)   # builds the bus' content map
    assert state_digest(m) == d0
    v.driver.retry_timer_ms *= 2
    assert state_digest(m) != d0
    v.driver.retry_timer_ms //= 2
    m.hotplug.blocks._removed.add(5)
    assert state_digest(m) != d0


# -- resuming -----------------------------------------------------------------------------------

SCRIPT = [
    ("mem", BASE + 0x1000, b"A" * 8192),
    ("mem", 0x200000, b"boot RAM"),
    ("ctl", "virtio0 requested-size 2G"),
    ("mem", BASE + 0x7FF00000, b"C" * 4096),
    ("ctl", "virtio0 unplug 0x17fe00000 2M"),     # discards C
    ("ctl", "virtio0 plug 0x17fe00000 2M"),       # back to the state after 2G: a cycle
    ("mem", BASE + 0x7FE00000, b"D" * 4096),
    ("ctl", "virtio0 requested-size 1536M"),      # unplugs D's block
    ("sysfs", "memory33/state", "offline"),
    ("ctl", "virtio0 frobnicate"),                # fails: leaves nothing behind
    ("ctl", "virtio0 requested-size 3G"),
    ("mem", BASE + 0xBFF00000, b"E" * 4096),
    ("sysfs", "auto_online_blocks", "offline"),
    ("ctl", "virtio0 requested-size 1G"),
]
PROBES = sorted({s[1] for s in SCRIPT if s[0] == "mem"})


def test_resuming_gives_back_state_and_memory(tmp_path):
    b, m = open_backing(tmp_path)
    assert not b.resuming
    results = [run(m, step) for step in SCRIPT]
    live = observe(m, PROBES)
    assert live == observe(reference(SCRIPT), PROBES)
    assert memory_at(m, BASE + 0x1000, 8192) == b"A" * 8192
    assert memory_at(m, BASE + 0x7FE00000) == bytes(4096)   # unplugged: the hole was punched
    b.close()
    b, m = open_backing(tmp_path)
    assert b.resuming
    assert observe(m, PROBES) == live
    # the same answers from here on as a machine that never stopped
    more = [("ctl", "virtio0 requested-size 2G"), ("ctl", "virtio0 unplug-all"), ("ctl", "virtio0 requested-size 1G")]
    ref = reference(SCRIPT)
    assert [run(m, s) for s in more] == [run(ref, s) for s in more]
    assert observe(m, PROBES) == observe(ref, PROBES)
    assert "error" in results[9]
    b.close()


def test_memory_stays_in_files_and_discard_frees_them(tmp_path):
    b, m = open_backing(tmp_path)
    run(m, ("ctl", "virtio0 requested-size 2G"))
    m.bus.store(BASE + GIB, b"x" * (8 * MIB))
    chunk = tmp_path / "memory/virtio0/0000000040000000"
    assert chunk.stat().st_size == GIB and chunk.stat().st_blocks * 512 >= 8 * MIB
    with open(chunk, "rb") as f:
        assert f.read(4) == b"xxxx"     # MAP_SHARED: the file holds it, no sync needed
    run(m, ("ctl", "virtio0 requested-size 1G"))
    assert chunk.stat().st_blocks * 512 < MIB   # a hole now
    b.close()


def test_file_memory_matches_anonymous_memory(tmp_path):
    """The same writes and discards (unaligned, across chunk files, whole chunks) read the same from
    files as from anonymous memory, and again from the files alone."""
    size = 3 * GIB + 8192
    ops = [("w", 0, b"a" * 100), ("w", GIB - 50, b"b" * 100), ("d", 5000, 3000), ("w", 2 * GIB, b"c" * 9000),
           ("d", GIB - 4096, GIB + 100), ("w", 3 * GIB, b"t" * 8192), ("d", 2 * GIB + 10, 8000),
           ("w", GIB + 7, b"n" * 10), ("d", 0, GIB)]
    files, anon = FileMemory(size, str(tmp_path)), SparseMemory(size)
    for kind, off, arg in ops:
        for mem in (files, anon):
            mem.write(off, arg) if kind == "w" else mem.discard(off, arg)
    windows = [(0, 12000), (GIB - 8192, 16384), (2 * GIB - 100, 12000), (3 * GIB - 100, 8292)]
    want = [anon.read(off, n) for off, n in windows]
    assert [files.read(off, n) for off, n in windows] == want
    assert not (tmp_path / f"{0:016x}").exists()   # a whole chunk discarded: its file is gone
    again = FileMemory(size, str(tmp_path))         # what a restarted daemon maps
    assert [again.read(off, n) for off, n in windows] == want
    frozen = FileMemory(size, str(tmp_path), frozen=True)
    frozen.write(GIB + 7, b"x" * 10)
    frozen.discard(2 * GIB, 100)                    # ignored while frozen
    frozen.thaw()
    assert [frozen.read(off, n) for off, n in windows] == want
    for mem in (files, again, frozen):
        mem.close()


# -- compaction ---------------------------------------------------------------------------------

def test_cycles_and_failures_leave_nothing_behind(tmp_path):
    b, m = open_backing(tmp_path)
    lengths = []
    for _ in range(25):
        run(m, ("ctl", "virtio0 requested-size 2G"))
        run(m, ("ctl", "virtio0 requested-size 3G"))
        run(m, ("ctl", "virtio0 requested-size 2G"))
        n = len(m.journal)
        run(m, ("ctl", "virtio0 requested-size 9G"))    # fails
        run(m, ("ctl", "virtio0 frobnicate"))           # fails
        run(m, ("sysfs", "memory32/state", "online"))   # fails: online already
        run(m, ("sysfs", "auto_online_blocks", "sometimes"))  # fails
        assert len(m.journal) == n
        lengths.append(n)
    # the usable region never shrinks and high_memory is never lowered: 2G after 3G is a new
    # state, the first time only
    assert lengths[1:] == lengths[:1] * 24 and lengths[0] <= 4
    assert len(journal_lines(tmp_path)) == len(m.journal)
    live = observe(m)
    b.close()
    b, m = open_backing(tmp_path)
    assert observe(m) == live
    b.close()


def test_an_uncompacted_journal_is_compacted_at_recovery(tmp_path):
    b, m = open_backing(tmp_path)
    b.journal.compacting = False        # as a journal written without compaction
    for size in ("2G", "3G", "2G", "3G", "2G", "3G", "2G", "2G"):
        run(m, ("ctl", f"virtio0 requested-size {size}"))
    assert len(journal_lines(tmp_path)) == 8
    live = observe(m)
    b.close()
    b, m = open_backing(tmp_path)
    assert observe(m) == live and len(journal_lines(tmp_path)) == len(m.journal) == 4  # 2G 3G 2G 2G
    b.close()


COMMANDS = st.one_of(
    st.sampled_from(["0", "512M", "1G", "1536M", "2G", "3G", "4G"]).map(lambda s: ("ctl", f"virtio0 requested-size {s}")),
    st.tuples(st.sampled_from(["plug", "unplug"]), st.integers(0, 1023)).map(
        lambda t: ("ctl", f"virtio0 {t[0]} {BASE + t[1] * 2 * MIB:#x} 2M")),
    st.just(("ctl", "virtio0 unplug-all")),
    st.tuples(st.integers(32, 63), st.sampled_from(["offline", "online", "online_movable", "online_kernel"])).map(
        lambda t: ("sysfs", f"memory{t[0]}/state", t[1])),
    st.sampled_from(["offline", "online", "online_movable"]).map(lambda w: ("sysfs", "auto_online_blocks", w)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(COMMANDS, max_size=14), after=st.lists(COMMANDS, max_size=6))
def test_a_resumed_machine_behaves_as_one_that_never_stopped(tmp_path_factory, before, after):
    """Compaction drops only what the digest calls a cycle: the resumed machine must answer every
    later input as a machine that ran the whole history (outputs outside the digest included)."""
    path = tmp_path_factory.mktemp("backing")
    b, m = open_backing(path)
    for step in before:
        run(m, step)
    live = observe(m)
    b.close()
    b, m = open_backing(path)
    assert observe(m) == live
    ref = reference(before)
    assert [run(m, s) for s in after] == [run(ref, s) for s in after]
    assert observe(m) == observe(ref)
    b.close()


# -- crashes ------------------------------------------------------------------------------------

def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_hooks(point: str, monkeypatch) -> None:
    """Arm a SIGKILL at `point` of the next input (the child process' only)."""
    if point == "torn":        # half the line reached the file
        def write(self, line):
            os.write(self.fd, line[:len(line) // 2])
            _die()
        monkeypatch.setattr(Journal, "_write", write)
    elif point == "logged":    # the line is durable, nothing applied
        real = Journal.record

        def record(self, entry):
            real(self, entry)
            _die()
        monkeypatch.setattr(Journal, "record", record)
    elif point == "mid-apply":  # the device answered one request of several: discards half done
        from memfs.virtio_mem.device import VirtioMemDevice

        real_req = VirtioMemDevice.state_change_request

        def request(self, gpa, nb_blocks, plug):
            real_req(self, gpa, nb_blocks, plug)
            _die()
        monkeypatch.setattr(VirtioMemDevice, "state_change_request", request)
        monkeypatch.setattr(FileMemory, "discard", lambda *a: _die())
    elif point == "applied":   # applied in full, not yet marked
        monkeypatch.setattr(Journal, "_mark_applied", lambda self: _die())
    elif point == "cut":       # cut back to an earlier state, the in-memory journal not yet
        monkeypatch.setattr(Journal, "_cut", lambda self, k: _die())


@pytest.mark.parametrize("point", ["torn", "logged", "mid-apply", "applied", "cut"])
def test_a_crash_at_any_point_recovers_a_consistent_state(tmp_path, monkeypatch, point):
    """Kill the process at `point` while it applies each input of SCRIPT in turn; recovery gives the
    state before the input if its line was not complete, else the state after it, memory included."""
    inputs = [i for i, s in enumerate(SCRIPT) if s[0] != "mem"]
    kills = 0
    for i in inputs:
        path = tmp_path / f"at{i}"
        pid = os.fork()
        if pid == 0:  # the daemon to be killed
            try:
                b, m = open_backing(path)
                for step in SCRIPT[:i]:
                    run(m, step)
                _crash_hooks(point, monkeypatch)
                run(m, SCRIPT[i])
            finally:
                os._exit(3)   # not killed: the input never reached the point (no request, no cycle)
        _, wait = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(wait)
        done = SCRIPT[:i] if point == "torn" and killed else SCRIPT[:i + 1]
        kills += killed
        b, m = open_backing(path)
        assert observe(m, PROBES) == observe(reference(done), PROBES), (point, i, SCRIPT[i], killed)
        # and the journal goes on from there
        assert run(m, ("ctl", "virtio0 requested-size 2G")) == run(reference(done), ("ctl", "virtio0 requested-size 2G"))
        b.close()
    # every input writes its line; 6 make device requests; 2 close a cycle (plug back, a failure)
    assert kills == {"mid-apply": 6, "cut": 2}.get(point, len(inputs))


def test_an_input_cut_short_is_applied_again_memory_included(tmp_path, monkeypatch):
    """A driver run may unplug a block and plug it again within one input. Killed before the discard,
    the block is plugged in the replayed state, yet it must read zeros: a last line not marked
    applied is replayed with the stores live."""
    real = Control._dispatch

    def dispatch(self, words):   # "DEV bounce ADDR": unplug and plug again, as one input
        if words[1:2] == ["bounce"]:
            v = self.machine.device(words[0])
            v.driver.unplug_range(int(words[2], 16), 2 * MIB)
            v.driver.plug_range(int(words[2], 16), 2 * MIB)
            return "ok: bounced"
        return real(self, words)
    monkeypatch.setattr(Control, "_dispatch", dispatch)
    block = BASE + 0x7FE00000
    steps = [("ctl", "virtio0 requested-size 2G"), ("mem", block, b"X" * 4096), ("ctl", f"virtio0 bounce {block:#x}")]
    pid = os.fork()
    if pid == 0:
        try:
            b, m = open_backing(tmp_path)
            for step in steps[:-1]:
                run(m, step)
            monkeypatch.setattr(FileMemory, "discard", lambda *a: _die())  # killed before the discard
            run(m, steps[-1])
        finally:
            os._exit(3)
    assert os.WIFSIGNALED(os.waitpid(pid, 0)[1])
    assert int((tmp_path / "journal.applied").read_bytes()) == 1 and len(journal_lines(tmp_path)) == 2
    b, m = open_backing(tmp_path)
    assert observe(m, [block]) == observe(reference(steps), [block])
    assert memory_at(m, block) == bytes(4096)
    b.close()


# -- refusals -----------------------------------------------------------------------------------

def test_another_machine_is_refused_and_nothing_changes(tmp_path):
    b, m = open_backing(tmp_path)
    run(m, ("ctl", "virtio0 requested-size 2G"))
    b.close()
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "lock"}
    b2 = Backing(str(tmp_path))
    m2 = load_machine(settings={"memhp_default_state": "online"}, stores=b2.stores)
    with pytest.raises(MachineError, match=r"holds machine 'qemu-q35-2G' \(--set memhp_default_state="
                                           r"online_movable\), not this mount's 'qemu-q35-2G' \(--set "
                                           r"memhp_default_state=online\)"):
        b2.attach(m2)
    b2.close()
    assert {p: p.read_bytes() for p in before} == before
    b, m = open_backing(tmp_path)
    assert m.virtio["virtio0"].device.plugged_size == 2 * GIB
    b.close()


def test_a_dir_in_use_or_not_ours_is_refused(tmp_path):
    b, _ = open_backing(tmp_path / "d")
    with pytest.raises(BackingError, match="in use by the memfs daemon serving /test/mnt"):
        Backing(str(tmp_path / "d"))
    b.close()
    Backing(str(tmp_path / "d")).close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(BackingError, match="not empty and not a memfs backing dir"):
        Backing(str(tmp_path / "other"))
    assert (tmp_path / "other/notes.txt").read_text() == "mine"


def test_a_first_mount_that_died_before_recording_its_machine_starts_afresh(tmp_path):
    b, m = open_backing(tmp_path)
    m.bus.store(0x200000, b"stale")
    b.close()
    (tmp_path / "machine.json").unlink()
    b, m = open_backing(tmp_path)
    assert not b.resuming and m.memory.read(0x200000, 5) == bytes(5)
    b.close()
