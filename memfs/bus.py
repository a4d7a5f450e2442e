"""What each physical address reads as: the `PhysBus` that kernel/mem.py loads and stores through.

Decided from the flags and descriptors the resource tree already holds
(never from names), the deepest resource containing an address deciding:

| kind      | where (flags / desc)                                              | reads                       | writes  |
|-----------|-------------------------------------------------------------------|-----------------------------|---------|
| DEVICE    | a virtio-mem device region                                         | the device decides (plugged memory, or a fault) | the device decides |
| RAM       | IORESOURCE_SYSRAM on the address's resource or any above it         | what was stored (0 at first) | stored |
| FIRMWARE  | IORESOURCE_READONLY (ROMs), or desc RESERVED / ACPI_TABLES / ACPI_NV_STORAGE (e820 firmware) | the generated firmware over zeros; on machines without it (non-PC layouts) fixed pseudo-random bytes per page | dropped |
| FLOAT     | nothing there, or an IORESOURCE_WINDOW (a bridge window) with nothing below | 0xff (an unclaimed bus) | dropped |
| MMIO      | anything else (device registers, BARs, other e820 types)            | what was stored (0 at first) | stored |
"""
from __future__ import annotations

import bisect
import enum
import hashlib
from collections.abc import Iterator, Sequence
from typing import Protocol

from .kernel.ioport import (IORES_DESC_ACPI_NV_STORAGE, IORES_DESC_ACPI_TABLES, IORES_DESC_RESERVED,
                            IORESOURCE_READONLY, IORESOURCE_SYSRAM, IORESOURCE_WINDOW, Resource)
from .kernel.mem import BusFault
from .kernel.resindex import splice_runs, union
from .kernel.resource import ResourceTree
from .kernel.sizes import PAGE_SIZE
from .physmem import SparseMemory
from .virtio_mem.device import UnpluggedAccess, VirtioMemDevice

_FIRMWARE_DESCS = (IORES_DESC_RESERVED, IORES_DESC_ACPI_TABLES, IORES_DESC_ACPI_NV_STORAGE)


class Kind(enum.Enum):
    RAM = "ram"
    FIRMWARE = "firmware"
    MMIO = "mmio"
    FLOAT = "float"
    DEVICE = "device"


class FirmwareImage(Protocol):
    """Generated firmware content (tables, ROM images) laid over FIRMWARE ranges."""

    def overlay(self, addr: int, buf: bytearray) -> int:
        """Write the image's bytes over the parts of buf (at addr) it covers; returns how many."""


def classify(chain: Sequence[Resource]) -> Kind:
    """The kind of an address whose containing resources are `chain` (outermost first)."""
    if any(r.flags & IORESOURCE_SYSRAM for r in chain):
        return Kind.RAM
    if not chain:
        return Kind.FLOAT
    deepest = chain[-1]
    if deepest.flags & IORESOURCE_READONLY or deepest.desc in _FIRMWARE_DESCS:
        return Kind.FIRMWARE
    if deepest.flags & IORESOURCE_WINDOW:
        return Kind.FLOAT
    return Kind.MMIO


def firmware_bytes(offset: int, length: int) -> bytes:
    """Deterministic read-only content: the same bytes for an address on every machine and run."""
    first = offset // PAGE_SIZE
    last = (offset + length - 1) // PAGE_SIZE
    data = b"".join(hashlib.shake_128(b"memfs-firmware:%d" % pfn).digest(PAGE_SIZE) for pfn in range(first, last + 1))
    skip = offset - first * PAGE_SIZE
    return data[skip:skip + length]


Content = tuple[Kind, "VirtioMemDevice | None"]
_TOP = 1 << 64
_FLOAT_PAGE = b"\xff" * PAGE_SIZE  # bytes are immutable: every page-sized read of the floating bus shares it


class ContentMap:
    """Kinds over the address space as sorted runs: (start, kind, device or None).

    Like devmem.PolicyMap it follows the tree's changes range by range:
    `invalidate(start, end)` marks a range, `update()` redoes the marked
    ranges from the resources overlapping them.
    """

    def __init__(self, tree: ResourceTree, devices: Sequence[VirtioMemDevice]) -> None:
        self.tree = tree
        cuts = {0}
        for start, end in tree.boundaries():
            cuts.update((start, end + 1))
        self.spans = sorted(((d.addr, d.addr + d.region_size - 1, d) for d in devices), key=lambda s: s[0])
        self._span_starts = [start for start, _, _ in self.spans]
        for start, end, _ in self.spans:
            cuts.update((start, end + 1))
        self.starts: list[int] = []
        self.kinds: list[Content] = []
        for addr in sorted(c for c in cuts if c < _TOP):
            kind = self._kind(addr)
            if not self.kinds or kind != self.kinds[-1]:
                self.starts.append(addr)
                self.kinds.append(kind)
        self.pending: list[tuple[int, int]] = []
        # The run of the last lookup: (start, last byte, kind, device).
        self.hit: tuple[int, int, Kind, VirtioMemDevice | None] = (0, -1, Kind.FLOAT, None)

    def _kind(self, addr: int) -> Content:
        spans = self.spans
        i = bisect.bisect_right(self._span_starts, addr) - 1
        device = spans[i][2] if i >= 0 and addr <= spans[i][1] else None
        return (Kind.DEVICE, device) if device is not None else (classify(self.tree.lookup(addr)), None)

    def invalidate(self, start: int, end: int) -> None:
        """The tree changed what overlaps [start, end]: redo that range at the next update()."""
        self.pending.append((start, end))
        self.hit = (0, -1, Kind.FLOAT, None)
        if len(self.pending) > 4096:
            self.pending = union(self.pending)

    def update(self) -> None:
        if self.pending:
            dirty, self.pending = union(self.pending), []
            self.starts, self.kinds = splice_runs(self.starts, self.kinds, dirty, self._evaluate, _TOP)
            self.hit = (0, -1, Kind.FLOAT, None)

    def _evaluate(self, lo: int, hi: int) -> Iterator[tuple[int, Content]]:
        cuts = {lo}
        for r in self.tree.overlapping(lo, hi):
            for c in (r.start, r.end + 1):
                if lo < c <= hi:
                    cuts.add(c)
        for start, end, _ in self.spans:
            for c in (start, end + 1):
                if lo < c <= hi:
                    cuts.add(c)
        return ((addr, self._kind(addr)) for addr in sorted(cuts))

    def run(self, addr: int) -> tuple[int, int, Kind, VirtioMemDevice | None]:
        """(start, last byte, kind, device) of the run holding addr."""
        hit = self.hit
        if hit[0] <= addr <= hit[1]:
            return hit
        starts = self.starts
        i = bisect.bisect_right(starts, addr) - 1
        kind, device = self.kinds[i]
        hit = self.hit = (starts[i], starts[i + 1] - 1 if i + 1 < len(starts) else _TOP - 1, kind, device)
        return hit

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, Kind, VirtioMemDevice | None]]:
        """(start, length, kind, device) pieces covering [offset, offset+length)."""
        end = offset + length
        i = bisect.bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < end:
            stop = self.starts[i + 1] if i + 1 < len(self.starts) else _TOP
            n = min(stop, end) - pos
            kind, device = self.kinds[i]
            yield pos, n, kind, device
            pos += n
            i += 1


class Bus:
    """The machine's physical address space: RAM, MMIO, firmware, floating bus, virtio-mem."""

    def __init__(self, tree: ResourceTree, memory: SparseMemory, firmware: FirmwareImage | None = None) -> None:
        self.tree = tree
        self.memory = memory
        self.firmware = firmware
        self.devices: list[VirtioMemDevice] = []
        self._map: ContentMap | None = None
        tree.on_change(self._tree_changed)

    def attach(self, device: VirtioMemDevice) -> None:
        """Put a virtio-mem device on the bus: its region is the device's from now on."""
        self.devices.append(device)
        self._map = None

    def _tree_changed(self, start: int, end: int) -> None:
        if self._map is not None:
            self._map.invalidate(start, end)

    def _content(self) -> ContentMap:
        content = self._map
        if content is None:
            content = self._map = ContentMap(self.tree, self.devices)
        elif content.pending:
            content.update()
        return content

    def prepare(self) -> None:
        """Build what the first access would otherwise build (a mount does this before serving)."""
        self._content()

    def load(self, addr: int, size: int) -> bytes | memoryview:
        """PhysBus.load(): raises BusFault on unplugged, inaccessible virtio-mem memory; a range in
        one chunk of RAM is a view of it (no copy)."""
        content = self._map
        if content is None or content.pending:
            content = self._content()
        run = content.hit  # the run of the last access, where most accesses land again
        if not run[0] <= addr <= addr + size - 1 <= run[1]:
            if size <= 0:
                return b""
            run = content.run(addr)
            if addr + size - 1 > run[1]:
                parts = [self._load(start, n, kind, device) for start, n, kind, device in content.runs(addr, size)]
                return parts[0] if len(parts) == 1 else b"".join(parts)
        kind = run[2]
        if kind is Kind.RAM or kind is Kind.MMIO:
            return self.memory.view(addr, size)
        return self._load(addr, size, kind, run[3])

    def _load(self, start: int, n: int, kind: Kind, device: VirtioMemDevice | None) -> bytes:
        if kind is Kind.RAM or kind is Kind.MMIO:
            return self.memory.read(start, n)
        if kind is Kind.FLOAT:
            return _FLOAT_PAGE if n == PAGE_SIZE else b"\xff" * n
        if kind is Kind.FIRMWARE:
            return self._firmware(start, n)
        assert device is not None
        try:
            return device.guest_read(start, n)
        except UnpluggedAccess as e:
            raise BusFault(e.addr, e.strerror or str(e)) from None

    def store(self, addr: int, data: bytes | memoryview) -> None:
        """PhysBus.store(): firmware and the floating bus drop writes; raises BusFault as load() does."""
        view = memoryview(data)
        for start, n, kind, device in self._content().runs(addr, len(view)):
            piece = view[start - addr:start - addr + n]
            if kind is Kind.RAM or kind is Kind.MMIO:
                self.memory.write(start, piece)
            elif kind is Kind.DEVICE:
                assert device is not None
                try:
                    device.guest_write(start, piece)
                except UnpluggedAccess as e:
                    raise BusFault(e.addr, e.strerror or str(e)) from None

    def seed_ram(self, pieces: Sequence[tuple[int, bytes]]) -> None:
        """Firmware that lies in RAM (the IVT and BIOS data on some layouts) is RAM's boot content."""
        for addr, data in pieces:
            for start, n, kind, _ in self._content().runs(addr, len(data)):
                if kind is Kind.RAM:
                    self.memory.write(start, data[start - addr:start - addr + n])

    def dropping_runs(self, addr: int, size: int) -> list[tuple[int, int]]:
        """The (start, length) runs of the range that drop what is stored (firmware, floating bus)."""
        return [(start, n) for start, n, kind, _ in self._content().runs(addr, size)
                if kind is Kind.FIRMWARE or kind is Kind.FLOAT]

    def _firmware(self, addr: int, size: int) -> bytes:
        if self.firmware is None:
            return firmware_bytes(addr, size)
        buf = bytearray(size)
        self.firmware.overlay(addr, buf)
        return bytes(buf)
