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


class ContentMap:
    """Kinds over the address space as sorted runs: (start, kind, device or None)."""

    def __init__(self, tree: ResourceTree, devices: Sequence[VirtioMemDevice]) -> None:
        cuts = {0}
        for start, end in tree.boundaries():
            cuts.update((start, end + 1))
        spans = sorted((d.addr, d.addr + d.region_size - 1, d) for d in devices)
        for start, end, _ in spans:
            cuts.update((start, end + 1))
        self.starts: list[int] = []
        self.kinds: list[tuple[Kind, VirtioMemDevice | None]] = []
        for addr in sorted(c for c in cuts if c < 1 << 64):
            i = bisect.bisect_right(spans, addr, key=lambda s: s[0]) - 1
            device = spans[i][2] if i >= 0 and addr <= spans[i][1] else None
            kind = (Kind.DEVICE, device) if device is not None else (classify(tree.lookup(addr)), None)
            if not self.kinds or kind != self.kinds[-1]:
                self.starts.append(addr)
                self.kinds.append(kind)

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, Kind, VirtioMemDevice | None]]:
        """(start, length, kind, device) pieces covering [offset, offset+length)."""
        end = offset + length
        i = bisect.bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < end:
            stop = self.starts[i + 1] if i + 1 < len(self.starts) else 1 << 64
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
        self._generation = -1

    def attach(self, device: VirtioMemDevice) -> None:
        """Put a virtio-mem device on the bus: its region is the device's from now on."""
        self.devices.append(device)
        self._map = None

    def _content(self) -> ContentMap:
        if self._map is None or self._generation != self.tree.generation:
            self._map = ContentMap(self.tree, self.devices)
            self._generation = self.tree.generation
        return self._map

    def load(self, addr: int, size: int) -> bytes:
        """PhysBus.load(): raises BusFault on unplugged, inaccessible virtio-mem memory."""
        parts = []
        for start, n, kind, device in self._content().runs(addr, size):
            if kind is Kind.RAM or kind is Kind.MMIO:
                parts.append(self.memory.read(start, n))
            elif kind is Kind.FIRMWARE:
                parts.append(self._firmware(start, n))
            elif kind is Kind.FLOAT:
                parts.append(b"\xff" * n)
            else:
                assert device is not None
                try:
                    parts.append(device.guest_read(start, n))
                except UnpluggedAccess as e:
                    raise BusFault(e.addr, e.strerror or str(e)) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

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

    def drops_writes(self, addr: int, size: int) -> bool:
        """Whether any byte of the range drops what is stored (firmware, floating bus)."""
        return any(kind in (Kind.FIRMWARE, Kind.FLOAT) for _, _, kind, _ in self._content().runs(addr, size))

    def _firmware(self, addr: int, size: int) -> bytes:
        if self.firmware is None:
            return firmware_bytes(addr, size)
        buf = bytearray(size)
        self.firmware.overlay(addr, buf)
        return bytes(buf)
