"""Linux memory blocks and memory hotplug (spec sections 2.8, 2.9, 6.1).

Mirrors mm/memory_hotplug.c (add_memory_driver_managed, remove_memory,
offline_and_remove_memory), drivers/base/memory.c (memory block devices,
their sysfs files, memory notifiers) and the x86-64 parts of
arch/x86/mm/init_64.c (memory block size, max_pfn). Pure model: no page
allocator, so onlining and offlining only fail when a memory notifier vetoes
them or a block spans several zones.
"""
from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .ioport import (
    IORESOURCE_BUSY,
    IORESOURCE_SYSRAM_DRIVER_MANAGED,
    IORESOURCE_SYSTEM_RAM,
)
from .ioport import Resource
from .resource import ResourceConflict, ResourceTree

MiB = 1 << 20
GiB = 1 << 30
MIN_MEMORY_BLOCK_SIZE = 128 * MiB   # x86-64: 1 << SECTION_SIZE_BITS
MAX_BLOCK_SIZE = 2 * GiB
MEM_SIZE_FOR_LARGE_BLOCK = 64 * GiB

# x86-64 zone spans; ZONE_MOVABLE has no fixed span and is chosen at onlining.
_ZONE_SPANS = (("DMA", 0, 16 * MiB), ("DMA32", 16 * MiB, 4 * GiB), ("Normal", 4 * GiB, 1 << 64))
ZONE_MOVABLE = "Movable"

# include/linux/memory.h notifier actions.
MEM_ONLINE = 1 << 0
MEM_GOING_OFFLINE = 1 << 1
MEM_OFFLINE = 1 << 2
MEM_GOING_ONLINE = 1 << 3

# mhp_online_type_from_str() words; "offline" is MMOP_OFFLINE.
ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")


class HotplugError(OSError):
    """An operation the kernel fails with -errno; `.errno` is that errno (positive)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


def boot_ram(tree: ResourceTree) -> list[Resource]:
    """The e820 RAM the kernel booted with: busy top-level System RAM not added by a driver."""
    want = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
    return [r for r in tree.root.children
            if r.flags & want == want and not r.flags & IORESOURCE_SYSRAM_DRIVER_MANAGED]


def max_pfn_end(tree: ResourceTree) -> int:
    """e820__end_of_ram_pfn() << PAGE_SHIFT: a partial last page of RAM does not count."""
    return max(((r.end + 1) >> 12 << 12 for r in boot_ram(tree)), default=0)


def memory_block_size_bytes(boot_end: int, bare_metal: bool = False) -> int:
    """probe_memory_block_size() on x86-64 without set_memory_block_size_order().

    `boot_end` is max_pfn << PAGE_SHIFT: the exclusive end of the highest
    boot RAM.
    """
    if boot_end < MEM_SIZE_FOR_LARGE_BLOCK:
        return MIN_MEMORY_BLOCK_SIZE
    if bare_metal:
        return MAX_BLOCK_SIZE
    bz = MAX_BLOCK_SIZE
    while bz > MIN_MEMORY_BLOCK_SIZE and boot_end % bz:
        bz >>= 1
    return bz


def _zones_of(start: int, end: int) -> list[str]:
    """Kernel zones (x86-64 spans) that the inclusive range [start, end] touches."""
    return [name for name, lo, hi in _ZONE_SPANS if start < hi and end >= lo]


def _sysfs_word(text: str) -> str:
    """sysfs_streq() ignores one trailing newline."""
    return text[:-1] if text.endswith("\n") else text


def kstrtobool(text: str) -> bool:
    """kstrtobool(): y/Y/t/T/1, n/N/f/F/0, on/off; anything else is -EINVAL."""
    if text[:1] in ("y", "Y", "t", "T", "1"):
        return True
    if text[:1] in ("n", "N", "f", "F", "0"):
        return False
    if text[:1] in ("o", "O") and text[1:2] in ("n", "N", "f", "F"):
        return text[1:2] in ("n", "N")
    raise HotplugError(errno.EINVAL, f"invalid boolean {text!r}")


@dataclass(eq=False)
class MemoryBlock:
    """`struct memory_block`: one /sys/devices/system/memory/memoryN device.

    `zone` is the zone an online block belongs to, None while offline or
    when the block spans several zones (memory0 on x86; such a block cannot
    be offlined). `kernel_zone` is the zone MMOP_ONLINE / MMOP_ONLINE_KERNEL
    would pick: default_kernel_zone_for_pfn(), the first kernel zone the
    block intersects.
    """

    id: int
    start: int
    size: int
    state: str = "offline"
    zone: str | None = None
    nid: int = 0
    boot: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size - 1

    @property
    def kernel_zone(self) -> str:
        return _zones_of(self.start, self.end)[0]

    @property
    def online(self) -> bool:
        return self.state == "online"

    def phys_index_show(self) -> str:
        return f"{self.id:08x}\n"

    def state_show(self) -> str:
        return f"{self.state}\n"

    def online_show(self) -> str:
        return "1\n" if self.online else "0\n"

    def valid_zones_show(self) -> str:
        """valid_zones_show(): the zone (or none) if online, else default zone first."""
        if self.online:
            return f"{self.zone or 'none'}\n"
        return f"{self.kernel_zone} {ZONE_MOVABLE}\n"

    def removable_show(self) -> str:
        return "1\n"   # CONFIG_MEMORY_HOTREMOVE=y

    def phys_device_show(self) -> str:
        return "0\n"

    def show(self, attr: str) -> str:
        """The text of the sysfs file `attr` (one of MEMORY_BLOCK_ATTRS)."""
        if attr not in MEMORY_BLOCK_ATTRS:
            raise KeyError(attr)
        return getattr(self, f"{attr}_show")()


MEMORY_BLOCK_ATTRS = ("phys_index", "state", "online", "valid_zones", "removable", "phys_device")

MemoryNotifier = Callable[[int, MemoryBlock], None]


class MemoryHotplug:
    """Memory blocks and hot(un)plug of one machine, acting on its iomem tree.

    Boot memory blocks are created for every block that holds busy top-level
    System RAM (not driver-managed); blocks over holes do not exist.
    `high_memory_end` is the inclusive last byte of max_pfn: raised by
    add_memory (update_end_of_memory_vars), never lowered.

    Hook: `register_memory_notifier(fn)` gets fn(action, block) around every
    online/offline (raising HotplugError on MEM_GOING_* vetoes it, like a
    NOTIFY_BAD).
    """

    def __init__(self, tree: ResourceTree, block_size: int, auto_online_blocks: str = "online") -> None:
        if block_size <= 0 or block_size & (block_size - 1) or block_size % 4096:
            raise ValueError(f"memory block size {block_size:#x} is not a power of two multiple of 4 KiB")
        self.tree = tree
        self.block_size = block_size
        self.set_auto_online_blocks(auto_online_blocks)
        self.blocks: dict[int, MemoryBlock] = {}
        self._notifiers: list[MemoryNotifier] = []
        self.high_memory_end = -1
        self._create_boot_blocks()

    def _create_boot_blocks(self) -> None:
        zones: dict[int, set[str]] = {}
        self.high_memory_end = max_pfn_end(self.tree) - 1
        for ram in boot_ram(self.tree):
            for mb_id in range(ram.start // self.block_size, ram.end // self.block_size + 1):
                lo = max(ram.start, mb_id * self.block_size)
                hi = min(ram.end, (mb_id + 1) * self.block_size - 1)
                zones.setdefault(mb_id, set()).update(_zones_of(lo, hi))
        for mb_id in sorted(zones):
            zone = next(iter(zones[mb_id])) if len(zones[mb_id]) == 1 else None
            self.blocks[mb_id] = MemoryBlock(mb_id, mb_id * self.block_size, self.block_size,
                                             "online", zone, boot=True)

    # -- hooks and global sysfs files ---------------------------------------

    def register_memory_notifier(self, fn: MemoryNotifier) -> None:
        """register_memory_notifier()"""
        self._notifiers.append(fn)

    def set_auto_online_blocks(self, word: str) -> None:
        """auto_online_blocks_store(): one of ONLINE_TYPES, else -EINVAL."""
        word = _sysfs_word(word)
        if word not in ONLINE_TYPES:
            raise HotplugError(errno.EINVAL, f"auto_online_blocks: invalid value {word!r}")
        self.auto_online_blocks = word

    def auto_online_blocks_show(self) -> str:
        return f"{self.auto_online_blocks}\n"

    def block_size_bytes_show(self) -> str:
        return f"{self.block_size:x}\n"

    def block(self, mb_id: int) -> MemoryBlock:
        try:
            return self.blocks[mb_id]
        except KeyError:
            raise HotplugError(errno.ENOENT, f"memory{mb_id} does not exist") from None

    def blocks_in(self, start: int, size: int) -> Iterator[MemoryBlock]:
        """walk_memory_blocks(): existing blocks of [start, start+size), ascending."""
        for mb_id in range(start // self.block_size, (start + size - 1) // self.block_size + 1):
            if mb_id in self.blocks:
                yield self.blocks[mb_id]

    # -- onlining / offlining (memory_block_online / memory_block_offline) --

    def _notify(self, action: int, block: MemoryBlock) -> None:
        for fn in self._notifiers:
            fn(action, block)

    def _online(self, block: MemoryBlock, online_type: str) -> None:
        block.zone = ZONE_MOVABLE if online_type == "online_movable" else block.kernel_zone
        try:
            self._notify(MEM_GOING_ONLINE, block)
        except HotplugError:
            block.zone = None
            raise
        block.state = "online"
        self._notify(MEM_ONLINE, block)

    def _offline(self, block: MemoryBlock) -> None:
        if block.zone is None:
            raise HotplugError(errno.EINVAL, f"memory{block.id} spans several zones")
        self._notify(MEM_GOING_OFFLINE, block)
        block.state = "offline"
        block.zone = None
        self._notify(MEM_OFFLINE, block)

    def online_block(self, mb_id: int, online_type: str = "online") -> None:
        """Write `online_type` to memoryN/state: -EINVAL if already online."""
        if online_type not in ONLINE_TYPES[1:]:
            raise HotplugError(errno.EINVAL, f"invalid online type {online_type!r}")
        block = self.block(mb_id)
        if block.online:
            raise HotplugError(errno.EINVAL, f"memory{mb_id} is already online")
        self._online(block, online_type)

    def offline_block(self, mb_id: int) -> None:
        """Write `offline` to memoryN/state: -EINVAL if already offline."""
        block = self.block(mb_id)
        if not block.online:
            raise HotplugError(errno.EINVAL, f"memory{mb_id} is already offline")
        self._offline(block)

    def store_state(self, mb_id: int, text: str) -> None:
        """state_store(): offline | online | online_kernel | online_movable."""
        word = _sysfs_word(text)
        if word not in ONLINE_TYPES:
            raise HotplugError(errno.EINVAL, f"memory{mb_id}/state: invalid value {word!r}")
        if word == "offline":
            self.offline_block(mb_id)
        else:
            self.online_block(mb_id, word)

    def store_online(self, mb_id: int, text: str) -> None:
        """online_store(): kstrtobool; writing the current state succeeds."""
        want = kstrtobool(text)
        block = self.block(mb_id)
        if want and not block.online:
            self._online(block, "online")
        elif not want and block.online:
            self._offline(block)

    # -- add / remove ------------------------------------------------------

    def _check_range(self, start: int, size: int) -> None:
        """check_hotplug_memory_range(): block-aligned and non-empty, else -EINVAL."""
        if size <= 0 or start % self.block_size or size % self.block_size:
            raise HotplugError(errno.EINVAL, f"range {start:#x}+{size:#x} is not aligned to memory blocks "
                                             f"({self.block_size:#x})")

    def add_memory_driver_managed(self, start: int, size: int, resource_name: str, name_id: object,
                                  merge: bool = True, nid: int = 0) -> None:
        """add_memory_driver_managed() with MHP_MERGE_RESOURCE when `merge`.

        `name_id` stands for the kernel's name pointer: resources merge only
        with neighbours carrying the same token.
        """
        if not (resource_name.startswith("System RAM (") and resource_name.endswith(")")):
            raise HotplugError(errno.EINVAL, f"resource name {resource_name!r} is not 'System RAM (...)'")
        self._check_range(start, size)
        ids = range(start // self.block_size, (start + size) // self.block_size)
        if any(mb_id in self.blocks for mb_id in ids):
            raise HotplugError(errno.EEXIST, f"memory blocks of {start:#x}+{size:#x} already exist")
        try:
            res = self.tree.request_region(start, size, resource_name,
                                           IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED,
                                           name_id=name_id)
        except ResourceConflict as e:
            raise HotplugError(errno.EEXIST, f"Unable to reserve System RAM region: {e}") from None
        if merge:
            self.tree.merge_system_ram_resource(res)
        self.high_memory_end = max(self.high_memory_end, start + size - 1)
        for mb_id in ids:
            self.blocks[mb_id] = MemoryBlock(mb_id, mb_id * self.block_size, self.block_size, nid=nid)
        if self.auto_online_blocks != "offline":
            # add_memory_resource() ignores onlining errors: the rest stays offline.
            try:
                for mb_id in ids:
                    self._online(self.blocks[mb_id], self.auto_online_blocks)
            except HotplugError:
                pass

    def remove_memory(self, start: int, size: int) -> None:
        """remove_memory(): every block must be offline (-EBUSY), then it goes away."""
        self._check_range(start, size)
        online = [b.id for b in self.blocks_in(start, size) if b.online]
        if online:
            raise HotplugError(errno.EBUSY, f"memory blocks {online} are still online")
        try:
            self.tree.release_mem_region_adjustable(start, size)
        except ResourceConflict:
            pass   # the kernel finds nothing to adjust and leaves the tree alone
        for block in list(self.blocks_in(start, size)):
            del self.blocks[block.id]

    def offline_and_remove_memory(self, start: int, size: int) -> None:
        """offline_and_remove_memory(): offline every block, remove; re-online on failure."""
        self._check_range(start, size)
        offlined: list[tuple[MemoryBlock, str]] = []
        try:
            for block in list(self.blocks_in(start, size)):
                if block.online:
                    # try_offline_memory_block() senses the online type from the zone.
                    kind = "online_movable" if block.zone == ZONE_MOVABLE else "online_kernel"
                    self._offline(block)
                    offlined.append((block, kind))
            self.remove_memory(start, size)
        except HotplugError:
            for block, kind in offlined:
                try:
                    self._online(block, kind)
                except HotplugError:
                    pass   # try_reonline_memory_block() ignores failures too
            raise
