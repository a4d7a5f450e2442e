"""Unmovable kernel memory in a virtio-mem device: memfs's stand-in for the page allocator.

Memory onlined to a kernel zone (ZONE_NORMAL) collects unmovable kernel
allocations (page tables, slab, ...): a real 6.1 guest asked for
requested-size 0 after growing keeps its first hot-added memory block with
10-12 MiB plugged, and the driver keeps retrying; memory onlined to
ZONE_MOVABLE empties completely. Modelled deterministically: the driver's
`unmovable_size` bytes land once, in the device's first block onlined to a
kernel zone; virtio_mem_fake_offline() and offline_pages() fail there with
-EBUSY (MemoryHotplug.has_unmovable_pages()).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..kernel.memory_hotplug import ZONE_MOVABLE, MemoryBlock
from ..kernel.sizes import PAGE_SIZE, SZ_1M
from .sbm import Sbm

if TYPE_CHECKING:
    from .driver import VirtioMemDriver

# What a Debian 12 (6.1) guest keeps plugged after requested-size 0: 10-12 MiB.
DEFAULT_UNMOVABLE_SIZE = 10 * SZ_1M


def place_unmovable(vm: VirtioMemDriver, block: MemoryBlock) -> None:
    """Called as `block` of vm's device goes online: let it take the unmovable memory if due.

    The first block onlined to a kernel zone while no other block holds them
    takes unmovable_size bytes at its start, rounded up to subblocks (BBM:
    pages), within its plugged head; with blocks added and onlined in
    ascending order, that is the lowest kernel-zone block. Sets
    vm.unmovable_mb_id.
    """
    if vm.unmovable_mb_id is not None or block.zone == ZONE_MOVABLE:
        return
    if isinstance(vm.mode, Sbm):
        granule, head = vm.mode.sb_size, vm.mode.first_unplugged_sb(block.id) * vm.mode.sb_size
    else:
        granule, head = PAGE_SIZE, block.size
    size = min(-(-vm.unmovable_size // granule) * granule, head)
    if size:
        vm.hotplug.alloc_unmovable(block.id, size)
        vm.unmovable_mb_id = block.id
