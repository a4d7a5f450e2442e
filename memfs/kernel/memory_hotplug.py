"""Linux memory blocks and memory hotplug (spec sections 2.8, 2.9, 6.1).

Mirrors mm/memory_hotplug.c (add/remove memory), drivers/base/memory.c (memory
block devices, their sysfs files, notifiers) and arch/x86/mm/init_64.c (memory block
size, max_pfn). The page allocator's only trace is unmovable memory (alloc_unmovable):
offlining fails only on it, on a notifier veto or on a block spanning several zones.
"""
from __future__ import annotations

import errno
import heapq
from contextlib import suppress
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from sortedcontainers import SortedList

from ..changes import MemoryChanged
from .ioport import IORESOURCE_BUSY, IORESOURCE_SYSRAM_DRIVER_MANAGED, IORESOURCE_SYSTEM_RAM, Resource
from .resindex import union
from .resource import ResourceConflict, ResourceTree
from .sizes import PAGE_MASK, PAGE_SIZE, SZ_1G, SZ_1M

MIN_MEMORY_BLOCK_SIZE = 128 * SZ_1M   # x86-64: 1 << SECTION_SIZE_BITS
MAX_BLOCK_SIZE = 2 * SZ_1G
MEM_SIZE_FOR_LARGE_BLOCK = 64 * SZ_1G
# x86-64 zone spans; ZONE_MOVABLE has no fixed span and is chosen at onlining.
_ZONE_SPANS = (("DMA", 0, 16 * SZ_1M), ("DMA32", 16 * SZ_1M, 4 * SZ_1G), ("Normal", 4 * SZ_1G, 1 << 64))
ZONE_MOVABLE = "Movable"
# include/linux/memory.h notifier actions.
MEM_ONLINE = 1 << 0
MEM_GOING_OFFLINE = 1 << 1
MEM_OFFLINE = 1 << 2
MEM_GOING_ONLINE = 1 << 3

_PROBE_IDS = 16   # ranges of fewer memory blocks are walked id by id (MemoryBlocks.ids_from)

# mhp_online_type_from_str() words; "offline" is MMOP_OFFLINE.
ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")


class HotplugError(OSError):
    """An operation the kernel fails with -errno: HotplugError(errno, message), `.errno` positive."""
    errno: int


def boot_ram(tree: ResourceTree) -> list[Resource]:
    """The e820 RAM the kernel booted with: busy top-level System RAM not added by a driver."""
    want = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
    return [r for r in tree.root.children if r.flags & want == want and not r.flags & IORESOURCE_SYSRAM_DRIVER_MANAGED]


def max_pfn_end(tree: ResourceTree) -> int:
    """e820__end_of_ram_pfn() << PAGE_SHIFT: a partial last page of RAM does not count."""
    return max(((r.end + 1) & PAGE_MASK for r in boot_ram(tree)), default=0)


def memory_block_size_bytes(boot_end: int, bare_metal: bool = False) -> int:
    """probe_memory_block_size() on x86-64 (no set_memory_block_size_order()); boot_end: max_pfn << PAGE_SHIFT."""
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


def kstrtobool(text: str) -> bool:
    """kstrtobool(): y/Y/t/T/1, n/N/f/F/0, on/off; anything else is -EINVAL."""
    first, second = text[:1].lower(), text[1:2].lower()
    if first in ("y", "t", "1") or (first, second) == ("o", "n"):
        return True
    if first in ("n", "f", "0") or (first, second) == ("o", "f"):
        return False
    raise HotplugError(errno.EINVAL, f"invalid boolean {text!r}")


@dataclass(eq=False)
class MemoryBlock:
    """`struct memory_block`: one /sys/devices/system/memory/memoryN device.

    `zone`: the zone of an online block, None while offline or when it
    spans several zones (memory0 on x86; it cannot be offlined).
    `kernel_zone`: what MMOP_ONLINE[_KERNEL] picks (default_kernel_zone_for_pfn(),
    the first kernel zone it intersects). `unmovable_size`: bytes of
    unmovable kernel allocations at its start (alloc_unmovable).
    """

    id: int
    start: int
    size: int
    state: str = "offline"
    zone: str | None = None
    nid: int = 0
    boot: bool = False
    unmovable_size: int = 0

    @property
    def end(self) -> int:
        return self.start + self.size - 1

    @property
    def kernel_zone(self) -> str:
        return _zones_of(self.start, self.end)[0]

    @property
    def online(self) -> bool:
        return self.state == "online"

    def unmovable_reason(self) -> str:
        """Why the unmovable memory cannot go: says which block and zone."""
        return f"unmovable pages in memory{self.id}, ZONE_{(self.zone or '').upper()}"

    def show(self, attr: str) -> str:
        """The text of sysfs file memoryN/`attr`: <attr>_show(); KeyError unless in MEMORY_BLOCK_ATTRS."""
        return {
            "phys_index": f"{self.id:08x}",
            "state": self.state,
            "online": "1" if self.online else "0",
            # The zone (or none) if online, else the default zone first.
            "valid_zones": (self.zone or "none") if self.online else f"{self.kernel_zone} {ZONE_MOVABLE}",
            "removable": "1",     # CONFIG_MEMORY_HOTREMOVE=y
            "phys_device": "0",
        }[attr] + "\n"


MEMORY_BLOCK_ATTRS = ("phys_index", "state", "online", "valid_zones", "removable", "phys_device")
MemoryNotifier = Callable[[int, MemoryBlock], None]


class MemoryBlocks(Mapping[int, MemoryBlock]):
    """drivers/base/memory.c's `memory_blocks` xarray: mb_id -> MemoryBlock, ascending.

    Boot blocks are id ranges, built on lookup; only blocks that differ from their boot
    default, were hot-added or removed are stored: the cost grows with resources and
    changes, not with the address space. Change blocks through MemoryHotplug (`record`).
    """

    def __init__(self, ram: Iterable[Resource], block_size: int) -> None:
        self.block_size = block_size
        self._ram = union((r.start, r.end) for r in ram)
        self._boot = union((start // block_size, end // block_size) for start, end in self._ram)
        self._stored: dict[int, MemoryBlock] = {}
        self._hot: SortedList[int] = SortedList()   # stored ids outside the boot ranges
        self._removed: set[int] = set()    # boot ids whose block went away

    def _is_boot(self, mb_id: int) -> bool:
        i = bisect_right(self._boot, mb_id, key=lambda run: run[0]) - 1
        return i >= 0 and mb_id <= self._boot[i][1]

    def _boot_zone(self, mb_id: int) -> str | None:
        """The zone of a boot block: the one its RAM lies in, None if several."""
        start, end = mb_id * self.block_size, (mb_id + 1) * self.block_size - 1
        zones: set[str] = set()
        i = bisect_right(self._ram, end, key=lambda ram: ram[0]) - 1
        while i >= 0 and self._ram[i][1] >= start:
            zones.update(_zones_of(max(start, self._ram[i][0]), min(end, self._ram[i][1])))
            i -= 1
        return zones.pop() if len(zones) == 1 else None

    def __contains__(self, mb_id: object) -> bool:
        return isinstance(mb_id, int) and (mb_id in self._stored or
                                           (mb_id not in self._removed and self._is_boot(mb_id)))

    def __getitem__(self, mb_id: int) -> MemoryBlock:
        block = self._stored.get(mb_id)
        if block is not None:
            return block
        if mb_id in self._removed or not self._is_boot(mb_id):
            raise KeyError(mb_id)
        return MemoryBlock(mb_id, mb_id * self.block_size, self.block_size, "online", self._boot_zone(mb_id),
                           boot=True)

    def __len__(self) -> int:
        return sum(last - first + 1 for first, last in self._boot) - len(self._removed) + len(self._hot)

    def __iter__(self) -> Iterator[int]:
        return self.ids_from(0)

    def ids_from(self, start: int, last: int | None = None) -> Iterator[int]:
        """xa_for_each_range(): the ids of existing blocks in [start, last] (no end: to the last), ascending.

        Costs the ids yielded plus a bisection: boot runs and hot-added ids are walked only
        where they meet the range (a short range is probed id by id: the common walk of one
        block or big block).
        """
        if last is not None and last - start < _PROBE_IDS:
            return (mb_id for mb_id in range(start, last + 1) if mb_id in self)
        first_run = max(bisect_right(self._boot, start, key=lambda run: run[0]) - 1, 0)
        runs = [(max(first, start), stop if last is None else min(stop, last))
                for first, stop in self._boot[first_run:] if last is None or first <= last]
        hot: Iterator[int] = self._hot.irange(start, last)
        if not any(lo <= hi for lo, hi in runs):
            return hot
        boot = (mb_id for lo, hi in runs for mb_id in range(lo, hi + 1) if mb_id not in self._removed)
        return heapq.merge(boot, hot)

    def record(self, block: MemoryBlock) -> None:
        """Keep a hot-added block, or a block whose state, zone or unmovable memory changed."""
        self._removed.discard(block.id)
        if block.boot and block.online and block.zone == self._boot_zone(block.id) and not block.unmovable_size:
            self._stored.pop(block.id, None)   # back to its boot default
            return
        if block.id not in self._stored and not self._is_boot(block.id):
            self._hot.add(block.id)
        self._stored[block.id] = block

    def remove(self, mb_id: int) -> None:
        """remove_memory_block_devices() for one existing block."""
        if self._is_boot(mb_id):
            self._removed.add(mb_id)
        elif mb_id in self._stored:
            self._hot.remove(mb_id)
        self._stored.pop(mb_id, None)


class MemoryHotplug:
    """Memory blocks and hot(un)plug of one machine, acting on its iomem tree.

    Boot blocks hold boot RAM (boot_ram); holes have none. `high_memory_end`: the last
    byte of max_pfn, raised by add_memory (update_end_of_memory_vars), never lowered.
    `changed(start, size)` follows every add and remove. Memory notifiers get
    fn(action, block) around every online/offline; HotplugError on MEM_GOING_* vetoes.
    """

    def __init__(self, tree: ResourceTree, block_size: int, auto_online_blocks: str = "online",
                 changed: MemoryChanged | None = None) -> None:
        if block_size <= 0 or block_size & (block_size - 1) or block_size % PAGE_SIZE:
            raise ValueError(f"memory block size {block_size:#x} is not a power of two multiple of 4 KiB")
        self.tree = tree
        self.block_size = block_size
        self.set_auto_online_blocks(auto_online_blocks)
        self.blocks = MemoryBlocks(boot_ram(tree), block_size)
        self.changed = changed if changed is not None else MemoryChanged()
        self._notifiers: list[MemoryNotifier] = []
        self.high_memory_end = max_pfn_end(tree) - 1

    def register_memory_notifier(self, fn: MemoryNotifier) -> None:
        """register_memory_notifier()"""
        self._notifiers.append(fn)

    def set_auto_online_blocks(self, word: str) -> None:
        """auto_online_blocks_store(): one of ONLINE_TYPES, else -EINVAL."""
        word = word.removesuffix("\n")   # as sysfs_streq()
        if word not in ONLINE_TYPES:
            raise HotplugError(errno.EINVAL, f"auto_online_blocks: invalid value {word!r}")
        self.auto_online_blocks = word

    def auto_online_blocks_show(self) -> str:
        return f"{self.auto_online_blocks}\n"

    def block_size_bytes_show(self) -> str:
        return f"{self.block_size:x}\n"

    def block(self, mb_id: int) -> MemoryBlock:
        """find_memory_block_by_id(): -ENOENT if memoryN does not exist."""
        try:
            return self.blocks[mb_id]
        except KeyError:
            raise HotplugError(errno.ENOENT, f"memory{mb_id} does not exist") from None

    def blocks_in(self, start: int, size: int) -> Iterator[MemoryBlock]:
        """walk_memory_blocks(): existing blocks of [start, start+size), ascending."""
        for mb_id in self.blocks.ids_from(start // self.block_size, (start + size - 1) // self.block_size):
            yield self.blocks[mb_id]

    def alloc_unmovable(self, mb_id: int, size: int) -> None:
        """Unmovable kernel allocations fill the first `size` bytes of memoryN (the caller's placement)."""
        block = self.block(mb_id)
        block.unmovable_size = size
        self.blocks.record(block)

    def has_unmovable_pages(self, start: int, size: int) -> MemoryBlock | None:
        """has_unmovable_pages(): the first block with unmovable memory in [start, start+size), or None."""
        return next((b for b in self.blocks_in(start, size) if b.unmovable_size and start < b.start + b.unmovable_size),
                    None)

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
        self.blocks.record(block)
        self._notify(MEM_ONLINE, block)

    def _offline(self, block: MemoryBlock) -> None:
        """offline_pages(): isolating the range fails (-EBUSY) on unmovable memory, before any notifier."""
        if block.zone is None:
            raise HotplugError(errno.EINVAL, f"memory{block.id} spans several zones")
        if block.unmovable_size:
            raise HotplugError(errno.EBUSY, block.unmovable_reason())
        self._notify(MEM_GOING_OFFLINE, block)
        block.state = "offline"
        block.zone = None
        self.blocks.record(block)
        self._notify(MEM_OFFLINE, block)

    def store_state(self, mb_id: int, text: str) -> None:
        """state_store(): offline | online | online_kernel | online_movable; -EINVAL for the current state."""
        word = text.removesuffix("\n")
        if word not in ONLINE_TYPES:
            raise HotplugError(errno.EINVAL, f"memory{mb_id}/state: invalid value {word!r}")
        block = self.block(mb_id)
        if block.online == (word != "offline"):
            raise HotplugError(errno.EINVAL, f"memory{mb_id} is already {block.state}")
        if word == "offline":
            self._offline(block)
        else:
            self._online(block, word)

    def store_online(self, mb_id: int, text: str) -> None:
        """online_store(): kstrtobool; writing the current state succeeds."""
        want = kstrtobool(text)
        block = self.block(mb_id)
        if want and not block.online:
            self._online(block, "online")
        elif not want and block.online:
            self._offline(block)

    def _check_hotplug_memory_range(self, start: int, size: int) -> None:
        """check_hotplug_memory_range(): block-aligned and non-empty, else -EINVAL."""
        if size <= 0 or start % self.block_size or size % self.block_size:
            raise HotplugError(errno.EINVAL, f"range {start:#x}+{size:#x} is not aligned to memory blocks "
                                             f"({self.block_size:#x})")

    def add_memory_driver_managed(self, start: int, size: int, resource_name: str, name_id: object,
                                  merge: bool = True, nid: int = 0) -> None:
        """add_memory_driver_managed() with MHP_MERGE_RESOURCE when `merge`; then signals `changed`.

        `name_id` stands for the kernel's name pointer (resources merge only with the same token).
        Raises HotplugError (EINVAL, EEXIST) having changed nothing.
        """
        if not (resource_name.startswith("System RAM (") and resource_name.endswith(")")):
            raise HotplugError(errno.EINVAL, f"resource name {resource_name!r} is not 'System RAM (...)'")
        self._check_hotplug_memory_range(start, size)
        ids = range(start // self.block_size, (start + size) // self.block_size)
        if next(self.blocks_in(start, size), None) is not None:
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
            self.blocks.record(MemoryBlock(mb_id, mb_id * self.block_size, self.block_size, nid=nid))
        if self.auto_online_blocks != "offline":
            # add_memory_resource() ignores onlining errors: the rest stays offline.
            with suppress(HotplugError):
                for mb_id in ids:
                    self._online(self.blocks[mb_id], self.auto_online_blocks)
        self.changed(start, size)

    def remove_memory(self, start: int, size: int) -> None:
        """remove_memory(): every block must be offline (-EBUSY), then it goes away; signals `changed`."""
        self._check_hotplug_memory_range(start, size)
        online = [b.id for b in self.blocks_in(start, size) if b.online]
        if online:
            raise HotplugError(errno.EBUSY, f"memory blocks {online} are still online")
        try:
            self.tree.release_mem_region_adjustable(start, size)
        except ResourceConflict:
            pass   # the kernel finds nothing to adjust and leaves the tree alone
        for block in list(self.blocks_in(start, size)):
            self.blocks.remove(block.id)
        self.changed(start, size)

    def offline_and_remove_memory(self, start: int, size: int) -> None:
        """offline_and_remove_memory(): offline every block, remove; re-online on failure."""
        self._check_hotplug_memory_range(start, size)
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
                with suppress(HotplugError):   # try_reonline_memory_block() ignores failures too
                    self._online(block, kind)
            raise
