"""SMBIOS structure table and entry points, as QEMU 7.2 builds them and SeaBIOS completes them.

Formats: DMTF DSP0134 (SMBIOS reference specification). Contents mirror
QEMU hw/smbios/smbios.c (types 1, 3, 4, 16, 17, 19, 32, 127, with QEMU's
handle numbering T<n>_BASE, 16 GiB per memory device, one type 19 per e820
RAM block) and SeaBIOS src/fw/biostables.c (smbios_new_type_0(): the type 0
it prepends when QEMU gives none; smbios_romfile_setup(): the table goes in
the F-segment when it is at most BUILD_MAX_SMBIOS_FSEG bytes, else in high
memory). Linux reads the result in drivers/firmware/dmi_scan.c and exports
it as /sys/firmware/dmi/tables/{smbios_entry_point,DMI}.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .checksum import fix_checksum
from .platform import FirmwareError, FirmwareStrings, Platform

MAX_SMBIOS_FSEG = 600           # SeaBIOS BUILD_MAX_SMBIOS_FSEG
DIMM_MAX = 16 << 30             # QEMU MAX_DIMM_SZ
T16_STD_MAX_KIB = 0x80000000    # larger: Extended Maximum Capacity
T17_STD_MAX_MIB = 0x7FFF        # larger: Extended Size
T19_STD_MAX_KIB = 0xFFFFFFFF    # larger: Extended Starting/Ending Address
UNKNOWN_HANDLE = 0xFFFF
NO_ERROR_INFO = 0xFFFE
QEMU64_CPUID_1 = (0x00060FB1, 0x078BFBFF)  # CPUID.1 EAX, EDX of QEMU's default qemu64 CPU
CPU_MHZ = 2000                  # QEMU's default max and current speed

EP21_LEN = 0x1F
EP30_LEN = 0x18
ENTRY_POINT_TYPES = ("2.8", "3.0")


def structure(kind: int, handle: int, formatted: bytes, strings: list[str]) -> bytes:
    """One structure: header, formatted area, then its string set (DSP0134 6.1.3)."""
    head = struct.pack("<BBH", kind, 4 + len(formatted), handle)
    text = b"".join(s.encode() + b"\0" for s in strings)
    return head + formatted + (text + b"\0" if text else b"\0\0")


class _Strings:
    """String numbers for one structure: empty strings are 0 ("Not Specified")."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def __call__(self, value: str) -> int:
        if not value:
            return 0
        self.items.append(value)
        return len(self.items)


def _type0(s: FirmwareStrings) -> bytes:
    st = _Strings()
    vendor, version = st(s.bios_vendor), st(s.bios_version)
    body = struct.pack("<BBHBB", vendor, version, 0xE800, st(s.bios_date), 0)  # segment, ROM size 64 KiB
    body += struct.pack("<Q", 1 << 3)                # "BIOS characteristics not supported"
    body += bytes([0x00, 0x04, 0, 0, 0xFF, 0xFF])    # targeted content distribution; release 0.0; no EC
    return structure(0, 0x0000, body, st.items)


def _type1(s: FirmwareStrings) -> bytes:
    st = _Strings()
    body = struct.pack("<BBBB", st(s.system_manufacturer), st(s.system_product), st(s.system_version),
                       st(s.system_serial))
    body += s.uuid_bytes + bytes([0x06, 0, 0])        # wake-up: power switch; no SKU, no family
    return structure(1, 0x0100, body, st.items)


def _type3(s: FirmwareStrings) -> bytes:
    st = _Strings()
    manufacturer = st(s.system_manufacturer)
    body = struct.pack("<BBBBBBBBBIBBBBB", manufacturer, 0x01, st(s.system_version), 0, 0,
                       0x03, 0x03, 0x03, 0x02, 0, 0, 0, 0, 0, 0)  # other; safe x3; security unknown
    return structure(3, 0x0300, body, st.items)


def _type4(s: FirmwareStrings, cpu: int, v3: bool) -> bytes:
    st = _Strings()
    socket, maker, version = st(f"CPU {cpu}"), st(s.system_manufacturer), st(s.system_version)
    body = struct.pack("<BBBB", socket, 0x03, 0x01, maker)       # central processor, family "Other"
    body += struct.pack("<II", *QEMU64_CPUID_1)
    body += struct.pack("<BBHHHBB", version, 0, 0, CPU_MHZ, CPU_MHZ, 0x41, 0x01)  # populated+enabled, upgrade other
    body += struct.pack("<HHH", UNKNOWN_HANDLE, UNKNOWN_HANDLE, UNKNOWN_HANDLE)
    body += struct.pack("<BBBBBBHH", 0, 0, 0, 1, 1, 1, 0x0002, 0x0001)  # 1 core, 1 enabled, 1 thread
    if v3:
        body += struct.pack("<HHH", 1, 1, 1)                     # core/enabled/thread count 2
    return structure(4, 0x0400 + cpu, body, st.items)


def _dimm_sizes(total: int) -> list[int]:
    sizes = []
    while total > 0:
        sizes.append(min(total, DIMM_MAX))
        total -= sizes[-1]
    return sizes


def _type16(total: int, dimms: int) -> bytes:
    kib = total >> 10
    capacity, extended = (kib, 0) if kib < T16_STD_MAX_KIB else (T16_STD_MAX_KIB, total)
    body = struct.pack("<BBBIHHQ", 0x01, 0x03, 0x06, capacity, NO_ERROR_INFO, dimms, extended)
    return structure(16, 0x1000, body, [])


def _type17(s: FirmwareStrings, index: int, size: int) -> bytes:
    st = _Strings()
    mib = -(-size // (1 << 20))
    short, extended = (mib, 0) if mib < T17_STD_MAX_MIB else (T17_STD_MAX_MIB, mib)
    locator = st(f"DIMM {index}")
    body = struct.pack("<HHHHHBBBBBHH", 0x1000, NO_ERROR_INFO, 0xFFFF, 0xFFFF, short, 0x09, 0,
                       locator, 0, 0x07, 0x0002, 0)  # DIMM, RAM, type detail "Other", speed unknown
    body += struct.pack("<BBBBB", st(s.system_manufacturer), 0, 0, 0, 0)
    body += struct.pack("<IHHHH", extended, 0, 0, 0, 0)  # configured speed, voltages unknown
    return structure(17, 0x1100 + index, body, st.items)


def _type19(index: int, start: int, end: int) -> bytes:
    first_kib, last_kib = start >> 10, end >> 10
    if last_kib < T19_STD_MAX_KIB:
        body = struct.pack("<IIHBQQ", first_kib, last_kib, 0x1000, 1, 0, 0)
    else:
        body = struct.pack("<IIHBQQ", T19_STD_MAX_KIB, T19_STD_MAX_KIB, 0x1000, 1, start, end)
    return structure(19, 0x1300 + index, body, [])


@dataclass(frozen=True)
class SmbiosTable:
    structures: tuple[bytes, ...]
    entry_point_type: str

    @property
    def data(self) -> bytes:
        return b"".join(self.structures)

    @property
    def version(self) -> tuple[int, int]:
        return (3, 0) if self.entry_point_type == "3.0" else (2, 8)

    def entry_point(self, table_address: int) -> bytes:
        """The entry point locating the table at `table_address`, checksums set."""
        data = self.data
        if self.entry_point_type == "3.0":
            ep = bytearray(b"_SM3_" + struct.pack("<BBBBBBBIQ", 0, EP30_LEN, 3, 0, 0, 1, 0, len(data),
                                                  table_address))
            fix_checksum(ep, 5)
            return bytes(ep)
        if table_address + len(data) > 1 << 32:
            raise FirmwareError("a 2.x entry point can only locate a table below 4 GiB")
        ep = bytearray(b"_SM_" + struct.pack("<BBBBHB5s", 0, EP21_LEN, 2, 8, max(map(len, self.structures)),
                                             0, bytes(5)))
        ep += b"_DMI_" + struct.pack("<BHIHB", 0, len(data), table_address, len(self.structures), 0x28)
        fix_checksum(ep, 0x15, 0x10)   # intermediate checksum: the _DMI_ part
        fix_checksum(ep, 4)            # the whole entry point
        return bytes(ep)


def build_table(platform: Platform, strings: FirmwareStrings, entry_point_type: str = "2.8") -> SmbiosTable:
    """Types 0, 1, 3, 4 per CPU, 16, 17 per 16 GiB of boot RAM, 19 per RAM block, 32, 127."""
    if entry_point_type not in ENTRY_POINT_TYPES:
        raise ValueError(f"entry point type must be one of {ENTRY_POINT_TYPES}, not {entry_point_type!r}")
    v3 = entry_point_type == "3.0"
    dimms = _dimm_sizes(platform.memory_size)
    parts = [_type0(strings), _type1(strings), _type3(strings)]
    parts += [_type4(strings, cpu, v3) for cpu in range(platform.cpus)]
    parts.append(_type16(platform.memory_size, len(dimms)))
    parts += [_type17(strings, i, size) for i, size in enumerate(dimms)]
    parts += [_type19(i, b.start, b.end) for i, b in enumerate(platform.memory_blocks)]
    parts.append(structure(32, 0x2000, bytes(7), []))   # reserved[6], boot status: no errors
    parts.append(structure(127, 0x7F00, b"", []))
    return SmbiosTable(tuple(parts), entry_point_type)
