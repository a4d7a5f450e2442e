"""The firmware's physical memory content, assembled where SeaBIOS leaves each piece.

| piece                         | where                                  | mirrors                               |
|-------------------------------|----------------------------------------|---------------------------------------|
| IVT + BDA (+ rest of page 0)  | 0x0                                    | SeaBIOS post.c ivt_init(), bda_init() |
| EBDA                          | the Reserved range below 640 KiB       | SeaBIOS EBDA                          |
| option ROM images             | each Video ROM / Adapter ROM range     | SeaBIOS optionroms.c copies them there |
| System ROM                    | 0xF0000-0xFFFFF                        | SeaBIOS romlayout.S, malloc_fseg()    |
| ACPI tables (+ big SMBIOS)    | the ACPI area (Reserved after low RAM) | romfile_loader.c, malloc_high()       |

Runtime tables in the F-segment come from its free space, allocated top down
as SeaBIOS's malloc does, in SeaBIOS's order: the SMBIOS table (when it is
at most 600 bytes), the SMBIOS entry point, then the RSDP. A larger SMBIOS
table goes at the top of the ACPI area, above the ACPI tables.
Every piece covers a whole resource of /proc/iomem, so a memory model can
serve a range from here or, where `read()` says None, fall back.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from . import acpi, bios, smbios
from .platform import FSEG, FirmwareError, FirmwareStrings, Platform

FSEG_POOL = (0xF5800, 0xF6000)  # the F-segment space this SeaBIOS build leaves to malloc_fseg()
TABLE_ALIGN = 16                 # SeaBIOS MALLOC_MIN_ALIGN
PAGE = 0x1000
HIGH_BIOS_ALIAS = (1 << 32) - 0x10000


@dataclass(frozen=True)
class Firmware:
    """Firmware memory content plus what Linux exports of it under /sys/firmware."""

    pieces: tuple[tuple[int, bytes], ...]   # (physical address, content), sorted, disjoint
    smbios_entry_point: bytes               # /sys/firmware/dmi/tables/smbios_entry_point
    dmi_table: bytes                        # /sys/firmware/dmi/tables/DMI
    acpi_tables: dict[str, bytes]           # /sys/firmware/acpi/tables/<name>
    smbios_entry_address: int
    dmi_table_address: int
    rsdp_address: int | None = None
    acpi_table_addresses: dict[str, int] = field(default_factory=dict)  # incl. RSDT, XSDT

    def __post_init__(self) -> None:
        end = -1
        for addr, data in self.pieces:
            if addr <= end or not data:
                raise FirmwareError(f"firmware pieces overlap or are empty at {addr:#x}")
            end = addr + len(data) - 1

    @cached_property
    def _starts(self) -> list[int]:
        return [addr for addr, _ in self.pieces]

    def _overlapping(self, addr: int, length: int) -> Iterator[tuple[int, bytes]]:
        """(offset into the request, bytes) for each piece overlapping [addr, addr+length)."""
        i = max(bisect.bisect_right(self._starts, addr) - 1, 0)
        stop = addr + length
        for base, data in self.pieces[i:]:
            if base >= stop:
                break
            lo, hi = max(addr, base), min(stop, base + len(data))
            if lo < hi:
                yield lo - addr, data[lo - base:hi - base]

    def read(self, addr: int, length: int) -> bytes | None:
        """The firmware bytes at [addr, addr+length), or None unless the firmware covers all of it."""
        parts = list(self._overlapping(addr, length))
        if sum(len(p) for _, p in parts) != length:
            return None
        return b"".join(p for _, p in parts)

    def overlay(self, addr: int, buf: bytearray) -> int:
        """Write the firmware's bytes over the parts of buf (= [addr, addr+len)) it covers; bytes written."""
        written = 0
        for offset, data in self._overlapping(addr, len(buf)):
            buf[offset:offset + len(data)] = data
            written += len(data)
        return written

    def sysfs(self) -> dict[str, bytes]:
        """The files Linux shows under /sys/firmware for this firmware, by path relative to it."""
        files = {"dmi/tables/smbios_entry_point": self.smbios_entry_point, "dmi/tables/DMI": self.dmi_table}
        files.update((f"acpi/tables/{name}", data) for name, data in self.acpi_tables.items())
        return files

    def covers(self, addr: int) -> bool:
        return any(True for _ in self._overlapping(addr, 1))


class _TopDown:
    """SeaBIOS malloc: each allocation at the top of what is left, aligned down."""

    def __init__(self, low: int, high: int, what: str) -> None:
        self.low, self.top, self.what = low, high, what

    def alloc(self, size: int, align: int = TABLE_ALIGN) -> int:
        addr = (self.top - size) // align * align
        if addr < self.low:
            raise FirmwareError(f"{size} bytes do not fit in the {self.what}")
        self.top = addr
        return addr


def build_firmware(platform: Platform, strings: FirmwareStrings | None = None,
                   smbios_entry: str = "2.8") -> Firmware:
    """Lay out SeaBIOS-like firmware for `platform`; smbios_entry is "2.8" (_SM_) or "3.0" (_SM3_)."""
    strings = strings or FirmwareStrings()
    pieces: list[tuple[int, bytes]] = []

    first_ram = platform.ram[0].start
    page0 = PAGE if first_ram >= PAGE else bios.IVT_BDA_SIZE
    pieces.append((0, bios.ivt_and_bda(platform, page0)))
    if platform.ebda is not None:
        pieces.append((platform.ebda.start, bios.ebda(platform.ebda)))
    if platform.video_rom is not None:
        pieces.append((platform.video_rom.start, bios.option_rom(platform.video_rom, video=True)))
    pieces += [(r.start, bios.option_rom(r, video=False)) for r in platform.adapter_roms]

    fseg = bios.system_rom(strings)
    pool = _TopDown(*FSEG_POOL, "F-segment")
    area = platform.acpi_area
    area_mem = bytearray(area.size) if area is not None else None
    high = _TopDown(area.start, area.end + 1, "ACPI area") if area is not None else None

    table = smbios.build_table(platform, strings, smbios_entry)
    data = table.data
    if len(data) <= smbios.MAX_SMBIOS_FSEG or high is None:
        table_at = pool.alloc(len(data))
        fseg[table_at - FSEG:table_at - FSEG + len(data)] = data
    else:
        table_at = high.alloc(len(data))
        assert area is not None and area_mem is not None
        area_mem[table_at - area.start:table_at - area.start + len(data)] = data
    entry = table.entry_point(table_at)
    entry_at = pool.alloc(len(entry))
    fseg[entry_at - FSEG:entry_at - FSEG + len(entry)] = entry

    rsdp_at = None
    tables: dict[str, bytes] = {}
    addresses: dict[str, int] = {}
    if area is not None and area_mem is not None and high is not None:
        blob = acpi.build(platform, strings, area.start, high.top)
        area_mem[blob.base - area.start:blob.base - area.start + len(blob.data)] = blob.data
        rsdp_at = pool.alloc(len(blob.rsdp))
        fseg[rsdp_at - FSEG:rsdp_at - FSEG + len(blob.rsdp)] = blob.rsdp
        tables, addresses = blob.tables, blob.addresses
        pieces.append((area.start, bytes(area_mem)))
    pieces.append((FSEG, bytes(fseg)))
    # The BIOS flash is mapped below 4 GiB (where the CPU's reset vector 0xFFFFFFF0 is) and its
    # last 64 KiB aliased at the F-segment, so both read the same.
    pieces.append((HIGH_BIOS_ALIAS, bytes(fseg)))

    pieces.sort()
    return Firmware(
        pieces=tuple(pieces), smbios_entry_point=entry, dmi_table=data, acpi_tables=tables,
        smbios_entry_address=entry_at, dmi_table_address=table_at, rsdp_address=rsdp_at,
        acpi_table_addresses=addresses,
    )
