"""virtio-mem device (QEMU, spec 7) and driver (Linux 6.1, spec 6.2-6.10)."""
from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs.kernel.ioport import IORESOURCE_BUSY, IORESOURCE_SYSTEM_RAM, Resource
from memfs.kernel.memory_hotplug import HotplugError, MemoryHotplug
from memfs.kernel.resource import ResourceTree
from memfs.physmem import SparseMemory
from memfs.virtio_mem.device import (
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    Response,
    UnpluggedAccess,
    VirtioMemDevice,
)
from memfs.virtio_mem.driver import BbmState, SbmState, VirtioMemDriver

MiB = 1 << 20
GiB = 1 << 30
MB = 128 * MiB       # x86-64 memory block size below 64 GiB of boot memory
SB = 2 * MiB         # subblock = max(device block 2 MiB, pageblock 2 MiB)
RAM_BUSY = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
PLUG, UNPLUG = VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG
VIRTIO_RAM = "System RAM (virtio_mem)"


# -- fixtures ------------------------------------------------------------------

def make_device(addr=0x100000000, region=4 * GiB, block=SB, requested=0, **kw) -> VirtioMemDevice:
    return VirtioMemDevice("vm0", addr, region, block, SparseMemory(region), requested_size=requested, **kw)


def boot_tree(*ram: tuple[int, int]) -> ResourceTree:
    tree = ResourceTree()
    for start, end in ram:
        tree.request_resource(Resource(start, end, "System RAM", RAM_BUSY))
    return tree


class Machine:
    """Boot RAM + one virtio-mem device + its driver, with every request recorded."""

    def __init__(self, ram=((0x100000, 0x7FFDFFFF),), auto="online", force_bbm=False, **dev_kw) -> None:
        self.tree = boot_tree(*ram)
        self.hp = MemoryHotplug(self.tree, MB, auto)
        self.dev = make_device(**dev_kw)
        self.requests: list[tuple[int, int, int]] = []
        handle = self.dev.handle_request

        def recording(req_type, addr=0, nb_blocks=0):
            self.requests.append((req_type, addr, nb_blocks))
            return handle(req_type, addr, nb_blocks)
        self.dev.handle_request = recording
        self.drv = VirtioMemDriver(self.dev, self.hp, force_bbm=force_bbm)
        self.drv.probe()

    def resize(self, size: int):
        self.dev.set_requested_size(size)
        self.requests.clear()
        return self.drv.run()

    def container_lines(self) -> list[str]:
        """/proc/iomem lines (r_show format) of the virtio0 subtree."""
        c = self.drv.parent_resource
        return [f"{c.start:08x}-{c.end:08x} : {c.name}"] + [
            f"{'  ' * (d + 1)}{r.start:08x}-{r.end:08x} : {r.name}" for r, d in self.tree.walk(c)]

    def virtio_blocks(self) -> list[int]:
        return sorted(i for i, b in self.hp.blocks.items() if not b.boot)

    def snapshot(self):
        """Everything a failed command must leave untouched."""
        return (self.container_lines(), [r.flags for r, _ in self.tree.walk()],
                {i: (b.state, b.zone) for i, b in self.hp.blocks.items()},
                self.dev.plugged_size, self.dev.plugged_runs(self.dev.addr, self.dev.region_size),
                self.drv.plugged_size, self.drv.plugged_ranges(), list(self.drv._states),
                self.drv.next_id, self.drv.offline_size, dict(self.dev.violations))


def check_invariants(m: Machine) -> None:
    tree, drv, dev, hp = m.tree, m.drv, m.dev, m.hp
    for node, _ in [(tree.root, 0), *tree.walk()]:
        kids = node.children
        assert all(a.end < b.start for a, b in zip(kids, kids[1:]))
        assert all(node.start <= c.start and c.end <= node.end and c.parent is node for c in kids)
    container = drv.parent_resource
    assert (container.flags, container.parent) == (0x09000200, tree.root)
    # Device and driver agree on what is plugged.
    assert dev.plugged_size == drv.plugged_size
    dev_runs = [(s, e) for s, e, p in dev.plugged_runs(dev.addr, dev.region_size) if p]
    assert dev_runs == drv.plugged_ranges()
    assert sum(e - s for s, e in dev_runs) == dev.plugged_size
    # Every added block lies inside one merged resource in the container, and
    # the driver's SBM state agrees with the block.
    for mb_id in range(drv.first_id, drv.next_id):
        state = drv.mb_state(mb_id)
        block = hp.blocks.get(mb_id)
        if state in (SbmState.UNUSED, SbmState.PLUGGED):
            assert block is None
            assert state == SbmState.PLUGGED or not drv.plugged_subblocks(mb_id)
            continue
        assert block is not None and drv.plugged_subblocks(mb_id)
        [res] = [r for r in container.children if r.start <= block.start and block.end <= r.end]
        assert (res.name, res.flags) == (VIRTIO_RAM, 0x87000200)
        full = len(drv.plugged_subblocks(mb_id)) == drv.sbs_per_unit
        expected = {("offline", None): "OFFLINE", ("online", "Normal"): "KERNEL",
                    ("online", "Movable"): "MOVABLE"}[block.state, block.zone]
        assert state.name == expected + ("" if full else "_PARTIAL")
    added = {r.start for r in container.children}
    assert all(r.flags & IORESOURCE_BUSY for r in container.children)
    assert added <= {b.start for b in hp.blocks.values() if not b.boot}
    assert drv.offline_size == sum(b.size for b in hp.blocks.values() if not b.boot and not b.online)


def errno_of(exc_info) -> int:
    return exc_info.value.errno


# -- device: realize and config --------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(block=512 * 1024), "at least"),
    (dict(block=3 * MiB), "power of two"),
    (dict(requested=3 * MiB), "requested-size"),
    (dict(addr=0x100100000), "memaddr"),
    (dict(requested=8 * GiB), "cannot exceed"),
])
def test_realize_checks(kw, message):
    with pytest.raises(ValueError, match=message):
        make_device(**kw)


def test_backend_must_match_region():
    with pytest.raises(ValueError):
        VirtioMemDevice("vm0", 0x100000000, 4 * GiB, SB, SparseMemory(GiB))


def test_usable_region_grows_with_requested_size_and_only_unplug_all_shrinks_it():
    dev = make_device(requested=0)
    assert dev.usable_region_size == 0
    notes = []
    dev.config_listeners.append(lambda: notes.append(dev.requested_size))
    dev.set_requested_size(GiB)
    assert dev.usable_region_size == GiB + 256 * MiB          # requested + EXTENT
    dev.set_requested_size(3 * GiB + 896 * MiB)
    assert dev.usable_region_size == 4 * GiB                  # capped at the region
    dev.set_requested_size(512 * MiB)
    assert dev.usable_region_size == 4 * GiB                  # never shrinks here
    dev.set_requested_size(512 * MiB)                         # unchanged: notified anyway
    assert notes == [GiB, 3 * GiB + 896 * MiB, 512 * MiB, 512 * MiB]
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL) == Response(VIRTIO_MEM_RESP_ACK)
    assert dev.usable_region_size == 768 * MiB
    dev.set_requested_size(0)
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL) == Response(VIRTIO_MEM_RESP_ACK)
    assert dev.usable_region_size == 0


@pytest.mark.parametrize("size", [GiB + MiB, 5 * GiB, -SB])
def test_qom_set_requested_size_rejects(size):
    dev = make_device(requested=GiB)
    with pytest.raises(ValueError):
        dev.set_requested_size(size)
    assert (dev.requested_size, dev.usable_region_size) == (GiB, GiB + 256 * MiB)


# -- device: requests, in QEMU's order of checks -------------------------------

BASE = 0x100000000


@pytest.mark.parametrize("req, addr, nb, expected", [
    (PLUG, BASE + MiB, 1, VIRTIO_MEM_RESP_ERROR),                  # misaligned
    (PLUG, BASE, 0, VIRTIO_MEM_RESP_ERROR),                        # empty
    (PLUG, BASE - SB, 1, VIRTIO_MEM_RESP_ERROR),                   # below the region
    (PLUG, BASE + 768 * MiB, 1, VIRTIO_MEM_RESP_ERROR),            # beyond usable (512M + 256M)
    (PLUG, BASE + 766 * MiB, 2, VIRTIO_MEM_RESP_ERROR),            # runs past usable
    (PLUG, BASE + 256 * MiB, 129, VIRTIO_MEM_RESP_NACK),           # 258 MiB > requested 512 - 256
    (PLUG, BASE, 129, VIRTIO_MEM_RESP_NACK),                       # NACK is checked before "already plugged"
    (PLUG, BASE, 1, VIRTIO_MEM_RESP_ERROR),                        # already plugged
    (PLUG, BASE + 254 * MiB, 2, VIRTIO_MEM_RESP_ERROR),            # half plugged
    (UNPLUG, BASE + 256 * MiB, 1, VIRTIO_MEM_RESP_ERROR),          # not plugged
    (UNPLUG, BASE + 768 * MiB, 1, VIRTIO_MEM_RESP_ERROR),          # beyond usable
    (PLUG, BASE + 256 * MiB, 128, VIRTIO_MEM_RESP_ACK),
    (UNPLUG, BASE, 128, VIRTIO_MEM_RESP_ACK),
])
def test_plug_unplug_responses(req, addr, nb, expected):
    dev = make_device(requested=512 * MiB)
    assert dev.handle_request(PLUG, BASE, 128).type == VIRTIO_MEM_RESP_ACK   # first 256 MiB
    size_before = dev.plugged_size
    assert dev.handle_request(req, addr, nb) == Response(expected)
    delta = nb * SB * (1 if req == PLUG else -1) if expected == VIRTIO_MEM_RESP_ACK else 0
    assert dev.plugged_size == size_before + delta


def test_busy_comes_after_range_checks():
    dev = make_device(requested=512 * MiB)
    dev.busy = True
    assert dev.handle_request(PLUG, BASE + MiB, 1).type == VIRTIO_MEM_RESP_ERROR
    assert dev.handle_request(PLUG, BASE, 300).type == VIRTIO_MEM_RESP_NACK
    assert dev.handle_request(PLUG, BASE, 1).type == VIRTIO_MEM_RESP_BUSY
    # UNPLUG_ALL with nothing plugged succeeds even while busy.
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL).type == VIRTIO_MEM_RESP_ACK
    dev.busy = False
    dev.handle_request(PLUG, BASE, 1)
    dev.busy = True
    assert dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL).type == VIRTIO_MEM_RESP_BUSY
    assert dev.plugged_size == SB


def test_state_requests():
    dev = make_device(requested=GiB)
    dev.handle_request(PLUG, BASE + 4 * SB, 4)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE + 4 * SB, 4) == Response(0, VIRTIO_MEM_STATE_PLUGGED)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE, 4) == Response(0, VIRTIO_MEM_STATE_UNPLUGGED)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE, 5) == Response(0, VIRTIO_MEM_STATE_MIXED)
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE, 0).type == VIRTIO_MEM_RESP_ERROR
    assert dev.handle_request(VIRTIO_MEM_REQ_STATE, BASE + 2 * GiB, 1).type == VIRTIO_MEM_RESP_ERROR


def test_unknown_request_breaks_the_device():
    dev = make_device(requested=GiB)
    assert dev.handle_request(7) is None
    assert dev.broken
    assert dev.handle_request(PLUG, BASE, 1) is None
    assert dev.plugged_size == 0


def test_unplugged_block_is_discarded_and_replugs_as_zeros():
    dev = make_device(requested=GiB)
    dev.handle_request(PLUG, BASE, 2)
    dev.guest_write(BASE + SB - 2, b"abcd")
    assert dev.guest_read(BASE + SB - 2, 4) == b"abcd"
    dev.handle_request(UNPLUG, BASE + SB, 1)
    dev.handle_request(PLUG, BASE + SB, 1)
    assert dev.guest_read(BASE + SB - 2, 4) == b"ab\0\0"


def test_unplug_all_discards_everything():
    dev = make_device(requested=GiB)
    dev.handle_request(PLUG, BASE, 2)
    dev.guest_write(BASE + SB - 2, b"abcd")
    dev.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL)
    dev.handle_request(PLUG, BASE, 2)
    assert dev.guest_read(BASE + SB - 2, 4) == b"\0\0\0\0"


# -- device: guest access ------------------------------------------------------

def test_plugged_runs_are_cut_at_block_state_changes():
    dev = make_device(requested=GiB)
    dev.handle_request(PLUG, BASE + SB, 2)
    assert dev.plugged_runs(BASE + MiB, 6 * MiB) == [
        (BASE + MiB, BASE + SB, False), (BASE + SB, BASE + 3 * SB, True), (BASE + 3 * SB, BASE + 7 * MiB, False)]
    assert dev.plugged_runs(BASE + SB, 4096) == [(BASE + SB, BASE + SB + 4096, True)]
    assert dev.plugged_runs(BASE, 0) == []
    with pytest.raises(ValueError):
        dev.plugged_runs(BASE - 4096, 8192)


def test_plugged_runs_over_a_huge_region_count_runs_not_blocks():
    region = 1 << 40
    dev = VirtioMemDevice("big", 1 << 40, region, SB, SparseMemory(region), requested_size=region)
    dev.handle_request(PLUG, (1 << 40) + 100 * GiB, 8)
    runs = dev.plugged_runs(1 << 40, region)   # 524288 blocks, 3 runs
    assert [(s - (1 << 40), e - (1 << 40), p) for s, e, p in runs] == [
        (0, 100 * GiB, False), (100 * GiB, 100 * GiB + 16 * MiB, True), (100 * GiB + 16 * MiB, region, False)]


def test_inaccessible_unplugged_memory_refuses_access_and_counts():
    dev = make_device(requested=GiB)
    dev.handle_request(PLUG, BASE, 1)
    dev.guest_write(BASE, b"x")
    with pytest.raises(UnpluggedAccess) as e:
        dev.guest_read(BASE + SB - 4, 8)
    assert (e.value.errno, e.value.addr) == (errno.EFAULT, BASE + SB)
    with pytest.raises(UnpluggedAccess):
        dev.guest_write(BASE + 3 * SB, b"y")
    with pytest.raises(UnpluggedAccess):
        dev.guest_read(BASE + 3 * SB, 1)
    assert dev.violations == {"read": 2, "write": 1}
    assert dev.guest_read(BASE, 1) == b"x"
    assert dev.violations == {"read": 2, "write": 1}


def test_accessible_unplugged_memory_reads_zeros_drops_writes_and_counts():
    dev = make_device(requested=GiB, unplugged_inaccessible=False)
    dev.handle_request(PLUG, BASE, 1)
    dev.guest_write(BASE + SB - 2, b"abcd")          # half lands, half is dropped
    assert dev.violations == {"read": 0, "write": 1}
    assert dev.guest_read(BASE + SB - 2, 4) == b"ab\0\0"
    assert dev.violations == {"read": 1, "write": 1}
    dev.handle_request(PLUG, BASE + SB, 1)
    assert dev.guest_read(BASE + SB - 2, 4) == b"ab\0\0"   # the dropped bytes never arrived


def test_info_memory_devices_format():
    dev = VirtioMemDevice("vm0", 0x140000000, 8 * GiB, SB, SparseMemory(8 * GiB),
                          requested_size=2 * GiB, memdev="mem0")
    dev.handle_request(PLUG, 0x140000000, 1024)
    assert dev.info_memory_devices() == (
        'Memory device [virtio-mem]: "vm0"\n'
        "  memaddr: 0x140000000\n"
        "  node: 0\n"
        "  requested-size: 2147483648\n"
        "  size: 2147483648\n"
        "  max-size: 8589934592\n"
        "  block-size: 2097152\n"
        "  memdev: /objects/mem0\n")


# -- driver: probe -----------------------------------------------------------------

def test_probe_creates_container_and_selects_sbm():
    m = Machine(requested=0)
    assert m.container_lines() == ["100000000-1ffffffff : virtio0"]
    assert m.drv.parent_resource.flags == 0x09000200
    assert (m.drv.in_sbm, m.drv.sb_size, m.drv.sbs_per_unit, m.drv.first_id) == (True, SB, 64, 32)
    assert m.drv.offline_threshold == GiB
    assert m.drv.work_pending and m.drv.config_changed
    assert not m.drv.unplug_all_required


@pytest.mark.parametrize("block, bb_size, threshold", [(128 * MiB, 128 * MiB, GiB), (GiB, GiB, 2 * GiB)])
def test_probe_selects_bbm_for_big_device_blocks(block, bb_size, threshold):
    m = Machine(block=block, requested=0)
    assert (m.drv.in_sbm, m.drv.unit_size, m.drv.offline_threshold) == (False, bb_size, threshold)
    assert m.drv.first_id == 0x100000000 // bb_size


def test_probe_fails_over_busy_memory():
    tree = boot_tree((0x100000, 0x7FFDFFFF))
    tree.request_region(0x180000000, MB, "System RAM (kmem)", IORESOURCE_SYSTEM_RAM)
    hp = MemoryHotplug(tree, MB)
    drv = VirtioMemDriver(make_device(), hp)
    before = [(r.start, r.end, r.flags) for r, _ in tree.walk()]
    with pytest.raises(HotplugError) as e:
        drv.probe()
    assert errno_of(e) == errno.EBUSY
    assert "could not reserve device region" in str(e.value)
    assert [(r.start, r.end, r.flags) for r, _ in tree.walk()] == before


def test_leftover_plugged_memory_is_unplugged_all_first():
    tree = boot_tree((0x100000, 0x7FFDFFFF))
    hp = MemoryHotplug(tree, MB)
    dev = make_device(requested=GiB)
    dev.handle_request(PLUG, BASE + GiB, 4)      # a previous guest's leftovers
    drv = VirtioMemDriver(dev, hp)
    drv.probe()
    assert drv.unplug_all_required
    assert drv.run().converged
    # UNPLUG_ALL freed the leftover; the driver then plugged from the bottom.
    assert drv.plugged_ranges() == [(BASE, BASE + GiB)]
    assert not drv.unplug_all_required


# -- driver: spec 6.10 worked example -----------------------------------------------

def test_spec_6_10_worked_example():
    m = Machine(ram=((0x100000, 0x7FFFFFFF), (0x100000000, 0x13FFFFFFF)),
                addr=0x140000000, region=8 * GiB, requested=0)
    assert m.drv.run().converged
    assert m.container_lines() == ["140000000-33fffffff : virtio0"]
    assert max(m.hp.blocks) == 39 and m.virtio_blocks() == []   # no memory40+ yet
    assert m.drv.first_id == 40

    # Step 1: 256 MiB. Two new blocks, each one PLUG of 64 device blocks.
    assert m.resize(256 * MiB).converged
    assert m.requests == [(PLUG, 0x140000000, 64), (PLUG, 0x148000000, 64)]
    assert m.container_lines() == ["140000000-33fffffff : virtio0",
                                   "  140000000-14fffffff : System RAM (virtio_mem)"]
    assert m.virtio_blocks() == [40, 41]
    assert [m.hp.blocks[i].phys_index_show() for i in (40, 41)] == ["00000028\n", "00000029\n"]
    assert m.hp.blocks[41].state_show() == "online\n"

    # Step 2: 200 MiB. 28 single-subblock unplugs from block 41, sb 63 down to 36.
    assert m.resize(200 * MiB).converged
    assert m.requests == [(UNPLUG, 0x148000000 + sb * SB, 1) for sb in range(63, 35, -1)]
    assert m.container_lines()[1] == "  140000000-14fffffff : System RAM (virtio_mem)"
    assert m.drv.mb_state(41) == SbmState.KERNEL_PARTIAL
    assert m.hp.blocks[41].state == "online"

    # Step 3: 100 MiB. KERNEL_PARTIAL block 41 first (sb 35..0, then removed),
    # then KERNEL block 40 loses sb 63..50.
    assert m.resize(100 * MiB).converged
    assert m.requests == ([(UNPLUG, 0x148000000 + sb * SB, 1) for sb in range(35, -1, -1)]
                          + [(UNPLUG, 0x140000000 + sb * SB, 1) for sb in range(63, 49, -1)])
    assert m.container_lines() == ["140000000-33fffffff : virtio0",
                                   "  140000000-147ffffff : System RAM (virtio_mem)"]
    assert 41 not in m.hp.blocks and m.drv.mb_state(41) == SbmState.UNUSED
    assert m.drv.mb_state(40) == SbmState.KERNEL_PARTIAL
    assert m.dev.plugged_size == 100 * MiB

    # Step 4: 0. Block 40's remaining 50 subblocks, then the block goes away.
    assert m.resize(0).converged
    assert m.requests == [(UNPLUG, 0x140000000 + sb * SB, 1) for sb in range(49, -1, -1)]
    assert m.container_lines() == ["140000000-33fffffff : virtio0"]
    assert m.virtio_blocks() == []
    assert m.hp.high_memory_end == 0x14FFFFFFF      # max_pfn never goes down
    check_invariants(m)


# -- driver: the project's default machine ------------------------------------------

def test_default_machine_sequence():
    # Boot RAM 0x100000-0x7ffdffff, virtio-mem at 4 GiB, region 4 GiB, 2 MiB
    # blocks, requested 1 GiB. first_mb_id = 0x100000000 / 128 MiB = 32.
    m = Machine(requested=GiB)
    r = m.drv.run()
    assert (r.rc, r.plugged_size, r.requested_size) == (0, GiB, GiB)
    # 1 GiB = 512 subblocks = 8 whole blocks 32..39, each one PLUG of 64.
    assert m.requests == [(PLUG, 0x100000000 + i * MB, 64) for i in range(8)]
    c = m.drv.parent_resource
    assert (c.start, c.end, c.name, c.flags) == (0x100000000, 0x1FFFFFFFF, "virtio0", 0x09000200)
    assert [(r.start, r.end, r.name, r.flags) for r in c.children] == [
        (0x100000000, 0x13FFFFFFF, VIRTIO_RAM, 0x87000200)]
    assert m.virtio_blocks() == list(range(32, 40))
    assert all(m.hp.blocks[i].state == "online" for i in range(32, 40))
    assert m.dev.plugged_size == GiB

    # 3 GiB: usable = min(4G, 3G + 256M) = 3.25 GiB -> last usable block
    # (0x100000000 + 0xd0000000 - 1) // 128 MiB = 57. diff 2 GiB = 1024
    # subblocks: no partial or UNUSED blocks, so 16 new blocks 40..55. With
    # auto-online every block is onlined at once, offline_size stays 0 and
    # the offline_threshold never stops it.
    assert m.resize(3 * GiB).converged
    assert m.dev.usable_region_size == 3 * GiB + 256 * MiB
    assert m.drv.last_usable_id == 57
    assert m.requests == [(PLUG, 0x100000000 + i * MB, 64) for i in range(8, 24)]
    assert [(r.start, r.end) for r in c.children] == [(0x100000000, 0x1BFFFFFFF)]
    assert m.virtio_blocks() == list(range(32, 56))

    # 512 MiB: diff 2.5 GiB = 1280 subblocks. Only KERNEL (full, online)
    # blocks exist: descending from 55, each fully plugged with >= 64 to go,
    # so one UNPLUG of 64 and offline_and_remove per block: 55..36 (20 blocks).
    assert m.resize(512 * MiB).converged
    assert m.requests == [(UNPLUG, 0x100000000 + i * MB, 64) for i in range(23, 3, -1)]
    assert [(r.start, r.end) for r in c.children] == [(0x100000000, 0x11FFFFFFF)]
    assert m.virtio_blocks() == [32, 33, 34, 35]
    assert m.dev.usable_region_size == 3 * GiB + 256 * MiB   # QEMU never shrinks it here

    # 514 MiB: diff 2 MiB = 1 subblock. No partial blocks; the lowest UNUSED
    # block is 36, so plug its subblock 0 (one PLUG of 1) and add all of it.
    assert m.resize(514 * MiB).converged
    assert m.requests == [(PLUG, 0x120000000, 1)]
    assert [(r.start, r.end) for r in c.children] == [(0x100000000, 0x127FFFFFF)]
    assert m.virtio_blocks() == [32, 33, 34, 35, 36]
    assert m.drv.mb_state(36) == SbmState.KERNEL_PARTIAL
    assert m.drv.plugged_subblocks(36) == [0]
    check_invariants(m)


def test_offline_threshold_and_requeue_after_onlining():
    # Blocks stay offline: at most offline_threshold = 1 GiB = 8 blocks.
    m = Machine(auto="offline", requested=2 * GiB)
    r = m.drv.run()
    assert (r.rc, r.plugged_size, r.retry_ms) == (-errno.ENOSPC, GiB, None)
    assert "offline_threshold" in r.reason
    assert m.virtio_blocks() == list(range(32, 40))
    assert m.drv.offline_size == GiB and not m.drv.work_pending
    # The work is queued again once half the threshold could be added.
    for mb_id in (32, 33, 34):
        m.hp.online_block(mb_id)
    assert m.drv.offline_size == 5 * MB and not m.drv.work_pending
    m.hp.online_block(35)
    assert m.drv.work_pending
    r = m.drv.run()
    assert (r.rc, r.plugged_size) == (-errno.ENOSPC, GiB + 4 * MB)
    assert m.virtio_blocks() == list(range(32, 44))
    check_invariants(m)


def test_unplug_prefers_offline_blocks_and_removes_them_without_offlining():
    m = Machine(auto="offline", requested=512 * MiB)
    m.drv.run()
    m.hp.online_block(32)
    m.hp.online_block(33, "online_movable")
    # 256 MiB = 128 subblocks: OFFLINE class first (35, 34), one UNPLUG per
    # block because the raw offline path merges adjacent plugged subblocks.
    r = m.resize(256 * MiB)
    assert r.converged
    assert m.requests == [(UNPLUG, 0x118000000, 64), (UNPLUG, 0x110000000, 64)]
    assert m.virtio_blocks() == [32, 33]
    assert (m.drv.mb_state(32), m.drv.mb_state(33)) == (SbmState.KERNEL, SbmState.MOVABLE)
    # Next: MOVABLE before KERNEL for whole blocks.
    m.resize(128 * MiB)
    assert m.requests == [(UNPLUG, 0x108000000, 64)]
    assert m.virtio_blocks() == [32]
    check_invariants(m)


def test_unplug_online_false_leaves_online_memory_alone():
    m = Machine(requested=512 * MiB)
    m.drv.unplug_online = False
    m.drv.run()
    r = m.resize(256 * MiB)
    assert (r.rc, r.plugged_size, m.requests) == (0, 512 * MiB, [])
    assert "unplug_online" in r.reason


def test_driver_vetoes_onlining_blocks_it_does_not_manage():
    m = Machine(auto="offline", requested=256 * MiB)
    m.drv.run()
    # Someone else adds memory inside virtio0: the driver has it as UNUSED.
    m.hp.add_memory_driver_managed(0x1F8000000, MB, "System RAM (kmem)", object())
    with pytest.raises(HotplugError) as e:
        m.hp.online_block(0x1F8000000 // MB)
    assert errno_of(e) == errno.EPERM
    m.hp.online_block(32)   # its own offline block is fine
    assert m.drv.mb_state(32) == SbmState.KERNEL


def test_busy_device_arms_a_doubling_retry_timer():
    m = Machine(requested=0)
    m.drv.run()
    m.dev.busy = True
    r1 = m.resize(GiB)
    r2 = m.drv.run()
    assert (r1.rc, r1.retry_ms, r2.retry_ms) == (-errno.ETXTBSY, 50_000, 100_000)
    assert "BUSY" in r1.reason and r1.plugged_size == 0
    m.dev.busy = False
    assert m.drv.run().converged
    assert m.drv.retry_timer_ms == 50_000
    check_invariants(m)


def test_device_error_marks_driver_broken():
    m = Machine(requested=0)
    m.drv.run()
    m.dev.state_change_request = lambda *args: VIRTIO_MEM_RESP_ERROR   # a confused host
    r = m.resize(GiB)
    assert (r.rc, m.drv.broken) == (-errno.EINVAL, True)
    assert "ERROR" in r.reason and "broken" in r.reason
    m.requests.clear()
    assert m.drv.run() is r and m.requests == []


def test_config_change_during_run_restarts_it():
    m = Machine(requested=0)
    m.drv.run()

    def host_lowers_target(action, block):
        if m.dev.requested_size == GiB:
            m.dev.set_requested_size(256 * MiB)
    # Onlining the first added block makes the host lower the target while plugging.
    m.hp.register_memory_notifier(host_lowers_target)
    r = m.resize(GiB)
    # Block 32 got plugged; the next PLUG saw config_changed (-EAGAIN); the
    # rerun re-read 256 MiB and plugged block 33 only.
    assert (r.rc, r.plugged_size, r.requested_size) == (0, 256 * MiB, 256 * MiB)
    assert m.requests == [(PLUG, 0x100000000, 64), (PLUG, 0x108000000, 64)]


# -- driver: BBM ------------------------------------------------------------------

def test_bbm_plugs_and_unplugs_whole_big_blocks():
    # 1 GiB device blocks: BBM, big blocks 4, 5, 6 (1 GiB each, from 4 GiB).
    m = Machine(block=GiB, requested=3 * GiB)
    assert m.drv.run().converged
    assert m.requests == [(PLUG, 0x100000000, 1), (PLUG, 0x140000000, 1), (PLUG, 0x180000000, 1)]
    assert m.virtio_blocks() == list(range(32, 56))
    assert [(r.start, r.end) for r in m.drv.parent_resource.children] == [(0x100000000, 0x1BFFFFFFF)]
    for mb_id in range(40, 48):                      # big block 5 entirely offline
        m.hp.offline_block(mb_id)
    for mb_id in range(32, 40):                      # big block 4 entirely Movable
        m.hp.offline_block(mb_id)
        m.hp.online_block(mb_id, "online_movable")
    # Pass 0 takes only completely offline big blocks: 5, not the higher 6.
    assert m.resize(2 * GiB).converged
    assert m.requests == [(UNPLUG, 0x140000000, 1)]
    # Pass 0 finds none, pass 1 (all online memory Movable) takes 4 before 6.
    assert m.resize(GiB).converged
    assert m.requests == [(UNPLUG, 0x100000000, 1)]
    assert [m.drv.bb_state(i) for i in (4, 5, 6)] == [BbmState.UNUSED, BbmState.UNUSED, BbmState.ADDED]
    assert m.virtio_blocks() == list(range(48, 56))
    assert m.drv.plugged_ranges() == [(0x180000000, 0x1C0000000)]
    assert m.drv.offline_size == 0


def test_force_bbm_with_small_device_blocks():
    # bb_size = max(2 MiB, 128 MiB): one PLUG of 64 device blocks per big block.
    m = Machine(requested=256 * MiB, force_bbm=True)
    assert m.drv.run().converged
    assert (m.drv.in_sbm, m.drv.unit_size) == (False, MB)
    assert m.requests == [(PLUG, 0x100000000, 64), (PLUG, 0x108000000, 64)]
    assert [m.drv.bb_state(i) for i in (32, 33, 34)] == [BbmState.ADDED, BbmState.ADDED, BbmState.UNUSED]


# -- driver: explicit operations ---------------------------------------------------

def test_plug_range_adds_partial_block_and_unplug_range_removes_it():
    m = Machine(requested=GiB)
    m.drv.run()
    m.dev.set_requested_size(GiB + 128 * MiB)   # usable 1.375 GiB: last usable block 42
    m.requests.clear()
    addr = 0x150000000 + 5 * SB          # block 42, subblocks 5..9
    m.drv.plug_range(addr, 5 * SB)
    assert m.requests == [(PLUG, addr, 5)]
    assert m.drv.mb_state(42) == SbmState.KERNEL_PARTIAL
    assert m.drv.plugged_subblocks(42) == [5, 6, 7, 8, 9]
    assert m.drv.next_id == 43 and m.drv.mb_state(41) == SbmState.UNUSED
    assert [(r.start, r.end) for r in m.drv.parent_resource.children] == [
        (0x100000000, 0x13FFFFFFF), (0x150000000, 0x157FFFFFF)]
    check_invariants(m)
    m.drv.unplug_range(addr + SB, 4 * SB)
    assert m.drv.plugged_subblocks(42) == [5]
    m.drv.plug_range(0x150000000, 5 * SB)     # fills sb 0..4 of the partial block
    assert m.drv.plugged_subblocks(42) == [0, 1, 2, 3, 4, 5]
    m.drv.unplug_range(0x150000000, 6 * SB)
    assert 42 not in m.hp.blocks and m.drv.mb_state(42) == SbmState.UNUSED
    assert m.drv.plugged_size == GiB
    check_invariants(m)


def test_plug_range_across_blocks_sends_one_plug_per_block():
    m = Machine(requested=GiB)
    m.drv.run()
    m.resize(GiB + 4 * SB)                  # run adds block 40 with sb 0..3
    m.requests.clear()
    m.drv.unplug_range(0x100000000 + 8 * MB - 2 * SB, 4 * SB)   # last 2 of 39, first 2 of 40
    assert m.requests == [(UNPLUG, 0x140000000, 2), (UNPLUG, 0x13FC00000, 2)]
    m.requests.clear()
    m.drv.plug_range(0x100000000 + 8 * MB - 2 * SB, 4 * SB)
    assert m.requests == [(PLUG, 0x13FC00000, 2), (PLUG, 0x140000000, 2)]
    assert m.drv.mb_state(39) == SbmState.KERNEL
    check_invariants(m)


@pytest.mark.parametrize("op, addr, size, err", [
    ("plug", 0x100000000 + MiB, SB, errno.EINVAL),          # misaligned
    ("plug", 0x100000000, 3 * MiB, errno.EINVAL),
    ("plug", 0x100000000, 0, errno.EINVAL),
    ("plug", 0xFFE00000, 2 * SB, errno.ERANGE),              # starts below the region
    ("plug", 0x1FFE00000, 2 * SB, errno.ERANGE),             # ends beyond it
    ("plug", 0x158000000, SB, errno.ERANGE),                 # block 43: beyond usable
    ("plug", 0x13FE00000, 2 * SB, errno.EBUSY),              # half plugged already
    ("plug", 0x140000000, 130 * MiB, errno.ENOSPC),          # more than requested - plugged
    ("unplug", 0x13FE00000, 2 * SB, errno.EBUSY),            # half unplugged
    ("unplug", 0x148000000, SB, errno.EBUSY),                # never plugged
])
def test_explicit_operations_validate_before_changing_anything(op, addr, size, err):
    # Blocks 32..39 plugged; then requested 1.125 GiB, not yet seen by the
    # driver: usable 1.375 GiB ends at 0x157ffffff, last usable block 42.
    m = Machine(requested=GiB)
    m.drv.run()
    m.dev.set_requested_size(GiB + 128 * MiB)
    before = m.snapshot()
    m.requests.clear()
    with pytest.raises(HotplugError) as e:
        getattr(m.drv, f"{op}_range")(addr, size)
    assert errno_of(e) == err
    assert m.requests == [] and m.snapshot() == before


def test_explicit_operations_refuse_a_busy_device_or_occupied_block():
    m = Machine(requested=2 * GiB)
    m.drv.run()
    m.resize(GiB)
    m.dev.busy = True
    before = m.snapshot()
    for op in (lambda: m.drv.unplug_range(0x100000000, SB), lambda: m.drv.plug_range(0x140000000, SB),
               m.drv.unplug_all):
        with pytest.raises(HotplugError) as e:
            op()
        assert errno_of(e) == errno.EBUSY
    assert m.snapshot() == before
    m.dev.busy = False
    m.tree.request_region(0x180000000, 4096, "squatter", parent=m.drv.parent_resource)
    with pytest.raises(HotplugError) as e:
        m.drv.plug_range(0x180000000 + MB // 2, SB)   # block 48, usable (2.25 GiB)
    assert errno_of(e) == errno.EBUSY


def test_unplug_all_removes_everything_and_shrinks_the_usable_region():
    m = Machine(requested=3 * GiB)
    m.drv.run()
    m.dev.set_requested_size(GiB)     # pending, not yet seen by the driver
    m.requests.clear()
    m.drv.unplug_all()
    assert m.requests == [(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0)]
    assert m.container_lines() == ["100000000-1ffffffff : virtio0"]
    assert m.virtio_blocks() == [] and m.dev.plugged_size == 0
    assert m.dev.usable_region_size == GiB + 256 * MiB
    assert m.drv.run().converged
    assert m.virtio_blocks() == list(range(32, 40))
    check_invariants(m)


# -- property: random targets and user actions keep everything consistent ----------

sizes = st.one_of(st.integers(0, 2048).map(lambda n: n * SB), st.integers(0, 32).map(lambda n: n * MB))
actions = st.one_of(
    st.tuples(st.just("resize"), sizes),             # qom-set, then the work item runs
    st.tuples(st.just("qom"), sizes),                # qom-set only: room for explicit plugs
    st.tuples(st.just("toggle"), st.integers(32, 63)),
    st.tuples(st.sampled_from(["plug", "unplug"]), st.integers(0, 767), st.integers(1, 96)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(auto=st.sampled_from(["online", "offline", "online_movable"]),
       steps=st.lists(actions, min_size=1, max_size=8))
def test_random_sequences_keep_invariants(auto, steps):
    m = Machine(auto=auto, requested=0)
    m.drv.run()
    for step in steps:
        if step[0] == "resize":
            offline_before = m.drv.offline_size
            r = m.resize(step[1])
            # The usable region (requested + 256 MiB, or all of it) always
            # has room, so only the offline threshold can stop the driver...
            assert r.rc == 0 and r.plugged_size == step[1] or (
                r.rc == -errno.ENOSPC and "offline_threshold" in r.reason)
            # ...and auto-onlined blocks do not add offline memory.
            if auto != "offline" and offline_before + MB <= GiB:
                assert (r.rc, r.plugged_size) == (0, step[1])
        elif step[0] == "qom":
            m.dev.set_requested_size(step[1])
        elif step[0] == "toggle":
            block = m.hp.blocks.get(step[1])
            if block is not None:
                if block.online:
                    m.hp.offline_block(step[1])
                else:
                    m.hp.online_block(step[1])
        else:
            addr = 0x100000000 + step[1] * SB
            try:
                getattr(m.drv, f"{step[0]}_range")(addr, step[2] * SB)
            except HotplugError:
                pass
        check_invariants(m)
