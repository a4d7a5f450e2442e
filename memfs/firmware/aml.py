"""A small AML encoder and the DSDT body built with it.

Encodings: ACPI spec chapter 20 (AML grammar: PkgLength, NameString, integer
prefixes, Scope/Device/Name/Package/Buffer) and 6.4 (resource descriptors).
It plays the part of QEMU's hw/acpi/aml-build.c; the DSDT mirrors the
pieces of QEMU's q35 DSDT (hw/i386/acpi-build.c build_dsdt()) that describe
what /proc/iomem shows: \\_SB.PCI0 (PNP0A08) with its bus range, the HPET
device (PNP0103, Linux's `PNP0103:00` under `HPET 0`), the MMCONFIG
reservation (PNP0C02, Linux's `pnp 00:05` under `PCI MMCONFIG`) and \\_S5.
"""
from __future__ import annotations

import struct

from .platform import FOUR_GIB, Platform

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F

END_TAG = bytes([0x79, 0x00])  # checksum 0: "treat as summing to zero"
STA_PRESENT = 0x0F             # present, enabled, shown in UI, functioning


def pkg_length(payload: int) -> bytes:
    """PkgLength for `payload` bytes that follow it (the encoding counts itself)."""
    if payload + 1 < 0x40:
        return bytes([payload + 1])
    for extra in (1, 2, 3):
        total = payload + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0x0F)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def name_string(path: str) -> bytes:
    """`\\_SB.PCI0`, `_HID`, ...: segments padded to 4 with '_'."""
    root = path.startswith("\\")
    parts = [p for p in path.lstrip("\\").split(".") if p]
    for p in parts:
        if not 0 < len(p) <= 4 or not (p[0].isupper() or p[0] == "_") or not all(
                c.isupper() or c.isdigit() or c == "_" for c in p):
            raise ValueError(f"bad AML name segment {p!r}")
    segs = b"".join(p.ljust(4, "_").encode() for p in parts)
    prefix = bytes([ROOT_CHAR]) if root else b""
    if len(parts) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs
    if len(parts) > 2:
        return prefix + bytes([MULTI_NAME_PREFIX, len(parts)]) + segs
    return prefix + (segs or b"\0")


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 0xFF), (WORD_PREFIX, "<H", 0xFFFF),
                               (DWORD_PREFIX, "<I", 0xFFFFFFFF), (QWORD_PREFIX, "<Q", (1 << 64) - 1)):
        if 0 <= value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer out of range: {value}")


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0A08"): three letters in 5 bits each, then four hex digits, as a DWORD."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    letters = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    raw = struct.pack(">HH", letters, int(text[3:], 16))
    return integer(struct.unpack("<I", raw)[0])


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *body: bytes) -> bytes:
    inner = name_string(path) + b"".join(body)
    return bytes([SCOPE_OP]) + pkg_length(len(inner)) + inner


def device(path: str, *body: bytes) -> bytes:
    inner = name_string(path) + b"".join(body)
    return bytes([EXT_OP, DEVICE_OP]) + pkg_length(len(inner)) + inner


def package(*elements: bytes) -> bytes:
    inner = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(inner)) + inner


def buffer(data: bytes) -> bytes:
    inner = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(inner)) + inner


def resource_template(*descriptors: bytes) -> bytes:
    return buffer(b"".join(descriptors) + END_TAG)


def memory32_fixed(base: int, length: int, writable: bool) -> bytes:
    """Memory32Fixed (ACPI 6.4.3.4): large item 0x86."""
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def word_bus_number(first: int, last: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode): large item 0x88, type 2."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, first, last, 0, last - first + 1)


def io_port(base: int, count: int) -> bytes:
    """IO (Decode16, base, base, 1, count): small item 0x47."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, count)


def dsdt_body(platform: Platform) -> bytes:
    """The DSDT's AML (after the table header)."""
    first_bus, last_bus = 0, 0xFF
    mmconfig = next((s for s in platform.pci_segments if s.segment == 0), None)
    if mmconfig is not None:
        first_bus, last_bus = mmconfig.bus_start, mmconfig.bus_end
    pci0 = device(
        "PCI0",
        name("_HID", eisa_id("PNP0A08")),
        name("_CID", eisa_id("PNP0A03")),
        name("_UID", integer(0)),
        name("_CRS", resource_template(word_bus_number(first_bus, last_bus), io_port(0xCF8, 8))),
    )
    devices = [pci0]
    if platform.hpet is not None:
        devices.append(device(
            "HPET",
            name("_HID", eisa_id("PNP0103")),
            name("_UID", integer(0)),
            name("_STA", integer(STA_PRESENT)),
            name("_CRS", resource_template(memory32_fixed(platform.hpet.start, platform.hpet.size, False))),
        ))
    if mmconfig is not None and mmconfig.range.end < FOUR_GIB:
        devices.append(device(
            "PDRC",
            name("_HID", eisa_id("PNP0C02")),
            name("_UID", integer(1)),
            name("_CRS", resource_template(memory32_fixed(mmconfig.range.start, mmconfig.range.size, True))),
        ))
    sleep_s5 = name("_S5", package(integer(0), integer(0), integer(0), integer(0)))
    return scope("\\_SB", *devices) + sleep_s5
