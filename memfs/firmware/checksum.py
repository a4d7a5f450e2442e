"""The one 8-bit checksum every firmware structure here uses.

ACPI tables and the RSDP (ACPI spec 5.2.5.3, 5.2.6), the SMBIOS entry points
(DMTF DSP0134 5.2) and legacy option ROMs (arch/x86/kernel/probe_roms.c,
romchecksum()) are all valid when their bytes sum to 0 modulo 256; the
firmware stores the byte that makes it so (SeaBIOS src/fw/biostables.c:
`ep.checksum -= checksum(...)`).
"""
from __future__ import annotations


def sum8(data: bytes | bytearray | memoryview) -> int:
    """The 8-bit sum of `data`."""
    return sum(data) & 0xFF


def fix_checksum(buf: bytearray, at: int, start: int = 0, end: int | None = None) -> None:
    """Set buf[at] so that buf[start:end] (which contains `at`) sums to 0 mod 256."""
    stop = len(buf) if end is None else end
    if not start <= at < stop:
        raise ValueError(f"checksum byte {at} outside the summed range {start}..{stop}")
    buf[at] = 0
    buf[at] = (-sum8(buf[start:stop])) & 0xFF
