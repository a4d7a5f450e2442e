"""Shared fixtures of the virtio-mem tests: a boot machine with one device and its driver."""
from __future__ import annotations

from memfs.kernel.ioport import IORESOURCE_BUSY, IORESOURCE_SYSTEM_RAM, Resource
from memfs.kernel.memory_hotplug import MemoryHotplug
from memfs.kernel.resource import ResourceTree
from memfs.kernel.sizes import SZ_1G, SZ_1M
from memfs.physmem import SparseMemory
from memfs.virtio_mem.device import VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VirtioMemDevice
from memfs.virtio_mem.driver import VirtioMemDriver
from memfs.virtio_mem.sbm import SbmState
from memfs.virtio_mem.unmovable import DEFAULT_UNMOVABLE_SIZE

MB = 128 * SZ_1M       # x86-64 memory block size below 64 GiB of boot memory
SB = 2 * SZ_1M         # subblock = max(device block 2 MiB, pageblock 2 MiB)
BASE = 0x100000000     # the default device's address
RAM_BUSY = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
PLUG, UNPLUG = VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG
VIRTIO_RAM = "System RAM (virtio_mem)"


def make_device(addr=0x100000000, region=4 * SZ_1G, block=SB, requested=0, **kw) -> VirtioMemDevice:
    return VirtioMemDevice("vm0", addr, region, block, SparseMemory(region), requested_size=requested, **kw)


def boot_tree(*ram: tuple[int, int]) -> ResourceTree:
    tree = ResourceTree()
    for start, end in ram:
        tree.request_resource(Resource(start, end, "System RAM", RAM_BUSY))
    return tree


class Machine:
    """Boot RAM + one virtio-mem device + its driver, with every request recorded."""

    def __init__(self, ram=((0x100000, 0x7FFDFFFF),), auto="online", force_bbm=False,
                 unmovable_size=DEFAULT_UNMOVABLE_SIZE, **dev_kw) -> None:
        self.tree = boot_tree(*ram)
        self.hp = MemoryHotplug(self.tree, MB, auto)
        self.dev = make_device(**dev_kw)
        self.requests: list[tuple[int, int, int]] = []
        handle = self.dev.handle_request

        def recording(req_type, addr=0, nb_blocks=0):
            self.requests.append((req_type, addr, nb_blocks))
            return handle(req_type, addr, nb_blocks)
        self.dev.handle_request = recording
        self.drv = VirtioMemDriver(self.dev, self.hp, force_bbm=force_bbm, unmovable_size=unmovable_size)
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
                self.drv.plugged_size, self.drv.plugged_ranges(), list(self.drv.mode.mb_states),
                self.drv.mode.next_mb_id, self.drv.offline_size, dict(self.dev.violations))


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
    for mb_id in range(drv.mode.first_mb_id, drv.mode.next_mb_id):
        state = drv.mode.get_mb_state(mb_id)
        block = hp.blocks.get(mb_id)
        if state in (SbmState.UNUSED, SbmState.PLUGGED):
            assert block is None
            assert state == SbmState.PLUGGED or not plugged_sb_ids(drv, mb_id)
            continue
        assert block is not None and plugged_sb_ids(drv, mb_id)
        [res] = [r for r in container.children if r.start <= block.start and block.end <= r.end]
        assert (res.name, res.flags) == (VIRTIO_RAM, 0x87000200)
        full = len(plugged_sb_ids(drv, mb_id)) == drv.mode.sbs_per_mb
        expected = {("offline", None): "OFFLINE", ("online", "Normal"): "KERNEL",
                    ("online", "Movable"): "MOVABLE"}[block.state, block.zone]
        assert state.name == expected + ("" if full else "_PARTIAL")
    added = {r.start for r in container.children}
    assert all(r.flags & IORESOURCE_BUSY for r in container.children)
    assert added <= {b.start for b in hp.blocks.values() if not b.boot}
    assert drv.offline_size == sum(b.size for b in hp.blocks.values() if not b.boot and not b.online)
    # Unmovable pages: at most the rounded-up amount, in one online kernel-zone
    # block of the device, on plugged subblocks from its start.
    holders = [b for b in hp.blocks.values() if b.unmovable_size]
    if drv.unmovable_mb_id is None:
        assert holders == []
    else:
        [holder] = holders
        n = holder.unmovable_size // SB
        assert holder.id == drv.unmovable_mb_id and holder.online and holder.zone == "Normal"
        assert 0 < holder.unmovable_size == n * SB <= -(-drv.unmovable_size // SB) * SB
        assert plugged_sb_ids(drv, holder.id)[:n] == list(range(n))


def plugged_sb_ids(drv: VirtioMemDriver, mb_id: int) -> list[int]:
    """Plugged subblocks of memory block mb_id (SBM), ascending."""
    sbm = drv.mode
    if not sbm.first_mb_id <= mb_id < sbm.next_mb_id:
        return []
    return [sb_id for sb_id in range(sbm.sbs_per_mb) if sbm.test_sb_plugged(mb_id, sb_id, 1)]


def errno_of(exc_info) -> int:
    return exc_info.value.errno
