"""What each physical address reads as, decided from the resource tree.

| kind      | where                                                      | reads                  | writes  |
|-----------|------------------------------------------------------------|------------------------|---------|
| RAM       | inside any System RAM resource                             | what was stored (0 at first) | stored |
| FIRMWARE  | ROMs, `Reserved`, ACPI tables/NVS, other e820 firmware ranges | fixed pseudo-random bytes per page | ignored |
| MMIO      | any other claimed resource (device registers, BARs)        | what was stored (0 at first) | stored |
| FLOAT     | bridge windows with nothing behind them, and gaps          | 0xff (an unclaimed bus) | ignored |
| DEVICE    | a virtio-mem device region                                 | the device decides (plugged memory or refusal) | the device decides |

The deepest resource containing an address decides, except that System RAM
anywhere above it makes it RAM and a virtio-mem region makes it DEVICE.
"""
from __future__ import annotations

import bisect
import enum
import hashlib
from collections.abc import Iterator

from .kernel.ioport import IORES_DESC_NONE, IORESOURCE_SYSRAM, IORESOURCE_WINDOW, Resource
from .kernel.resource import ResourceTree

PAGE = 4096
_FIRMWARE_NAMES = {"Reserved", "reserved", "Soft Reserved", "ACPI Tables", "ACPI Non-volatile Storage",
                   "Unknown E820 type", "Unusable memory", "RAM buffer"}


class Kind(enum.Enum):
    RAM = "ram"
    FIRMWARE = "firmware"
    MMIO = "mmio"
    FLOAT = "float"
    DEVICE = "device"


def classify(chain: list[Resource]) -> Kind:
    """The kind of an address whose containing resources are `chain` (outermost first)."""
    if any(r.flags & IORESOURCE_SYSRAM for r in chain):
        return Kind.RAM
    if not chain:
        return Kind.FLOAT
    deepest = chain[-1]
    name = deepest.name or ""
    if name.endswith("ROM") or name in _FIRMWARE_NAMES or deepest.desc != IORES_DESC_NONE:
        return Kind.FIRMWARE
    if deepest.flags & IORESOURCE_WINDOW or name.startswith("PCI Bus"):
        return Kind.FLOAT
    return Kind.MMIO


def firmware_bytes(offset: int, length: int) -> bytes:
    """Deterministic read-only content: the same bytes for an address on every machine and run."""
    first = offset // PAGE
    last = (offset + length - 1) // PAGE
    data = b"".join(hashlib.shake_128(b"memfs-firmware:%d" % pfn).digest(PAGE) for pfn in range(first, last + 1))
    skip = offset - first * PAGE
    return data[skip:skip + length]


class ContentMap:
    """Kinds over the address space as sorted runs: (start, kind, device or None)."""

    def __init__(self, tree: ResourceTree, devices: list[tuple[int, int, object]]) -> None:
        cuts = {0}
        for start, end in tree.boundaries():
            cuts.update((start, end + 1))
        for start, end, _ in devices:
            cuts.update((start, end + 1))
        self.starts: list[int] = []
        self.kinds: list[tuple[Kind, object]] = []
        for addr in sorted(c for c in cuts if c < 1 << 64):
            device = next((d for s, e, d in devices if s <= addr <= e), None)
            kind = (Kind.DEVICE, device) if device is not None else (classify(tree.lookup(addr)), None)
            if not self.kinds or kind != self.kinds[-1]:
                self.starts.append(addr)
                self.kinds.append(kind)

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, Kind, object]]:
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
