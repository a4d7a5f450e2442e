"""ACPI tables for a q35 VM, as QEMU 7.2 builds them and SeaBIOS's table loader places them.

Formats: ACPI spec 6.x chapter 5.2 (RSDP, RSDT, XSDT, FADT, FACS, MADT),
the IA-PC HPET spec (HPET table) and the PCI Firmware spec (MCFG). Contents
mirror QEMU hw/i386/acpi-build.c and hw/acpi/aml-build.c (build_fadt(),
build_hpet(), build_mcfg(), build_waet(), acpi_get_pm_info() for ICH9) and
hw/i386/acpi-common.c build_madt(): OEM "BOCHS "/"BXPC", FADT revision 3
with ICH9's PM block at 0x600, SCI 9, reset register 0xCF9, MADT with one
local APIC per CPU, the I/O APIC and QEMU's interrupt source overrides.
Placement follows SeaBIOS src/fw/romfile_loader.c: QEMU's one blob of
tables (FACS first, 64-byte aligned, then the others back to back) at the
start of the high table area, the RSDP in the F-segment. Unlike QEMU 7.2
(RSDP revision 0, RSDT only) the RSDP is revision 2 with an XSDT as well.
Linux exports the tables it installed (not the RSDT/XSDT) under
/sys/firmware/acpi/tables/, named as drivers/acpi/sysfs.c does.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import aml
from .checksum import fix_checksum
from .platform import FirmwareError, FirmwareStrings, Platform

HEADER_LEN = 36
FACS_LEN = 64
FACS_ALIGN = 64
RSDP_V2_LEN = 36
RSDP_V1_LEN = 20
FADT_REVISION = 3
FADT_V3_LEN = 244

# ICH9 (QEMU hw/isa/lpc_ich9.c, include/hw/southbridge/ich9.h)
PM_BASE = 0x600
GPE0_BLK, GPE0_LEN = 0x620, 16
SCI_IRQ = 9
SMI_CMD, ACPI_ENABLE, ACPI_DISABLE = 0xB2, 0x02, 0x03
RESET_PORT, RESET_VALUE = 0xCF9, 0x0F
RTC_CENTURY = 0x32
IAPC_8042 = 1 << 1
FADT_FLAGS = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 7) | (1 << 10) | (1 << 15)
# WBINVD, PROC_C1, SLP_BUTTON, RTC_S4, RESET_REG_SUP, USE_PLATFORM_CLOCK
FORCE_APIC_CLUSTER = 1 << 18   # QEMU sets it above 8 CPUs
SPACE_MEMORY, SPACE_IO = 0, 1

MADT_PCAT_COMPAT = 1
PCI_IRQS = (5, 9, 10, 11)       # QEMU ACPI_BUILD_PCI_IRQS: level, active high
ISO_LEVEL_HIGH = 0xD
IOAPIC_PINS = 24
HPET_BLOCK_ID = 0x8086A201      # build_hpet(): Intel, rev 1, 3 comparators, 64-bit, legacy routing
WAET_PM_TIMER_GOOD = 1 << 1


def gas(space: int, bits: int, address: int, access: int = 0) -> bytes:
    """Generic Address Structure (ACPI 5.2.3.2)."""
    return struct.pack("<BBBBQ", space, bits, 0, access, address)


def _pad(text: str, width: int) -> bytes:
    return text.encode().ljust(width, b" ")


def table(signature: str, revision: int, body: bytes, strings: FirmwareStrings) -> bytes:
    """A System Description Table: header (ACPI 5.2.6), body, checksum."""
    data = bytearray(struct.pack("<4sIBB6s8sI4sI", signature.encode(), HEADER_LEN + len(body), revision, 0,
                                 _pad(strings.acpi_oem_id, 6), _pad(strings.acpi_oem_table_id, 8), 1,
                                 b"BXPC", 1))
    data += body
    fix_checksum(data, 9)
    return bytes(data)


def facs() -> bytes:
    """QEMU build_facs(): signature, length, everything else zero."""
    return b"FACS" + struct.pack("<I", FACS_LEN) + bytes(FACS_LEN - 8)


def dsdt(platform: Platform, strings: FirmwareStrings) -> bytes:
    return table("DSDT", 1, aml.dsdt_body(platform), strings)


def fadt(platform: Platform, strings: FirmwareStrings, facs_at: int, dsdt_at: int) -> bytes:
    flags = FADT_FLAGS | (FORCE_APIC_CLUSTER if platform.cpus > 8 else 0)
    body = struct.pack("<IIBBHIBBBB", facs_at, dsdt_at, 1, 0, SCI_IRQ, SMI_CMD, ACPI_ENABLE, ACPI_DISABLE, 0, 0)
    body += struct.pack("<8I", PM_BASE, 0, PM_BASE + 4, 0, 0, PM_BASE + 8, GPE0_BLK, 0)
    body += struct.pack("<8B", 4, 2, 0, 4, GPE0_LEN, 0, 0, 0)
    body += struct.pack("<HHHHBBBBBHBI", 0xFFF, 0xFFF, 0, 0, 0, 0, 0, 0, RTC_CENTURY, IAPC_8042, 0, flags)
    body += gas(SPACE_IO, 8, RESET_PORT) + struct.pack("<B3x", RESET_VALUE)
    body += struct.pack("<QQ", 0, dsdt_at)  # X_FIRMWARE_CTRL 0: FIRMWARE_CTRL holds the FACS
    body += gas(SPACE_IO, 32, PM_BASE) + bytes(12)
    body += gas(SPACE_IO, 16, PM_BASE + 4) + bytes(12) + bytes(12)
    body += gas(SPACE_IO, 32, PM_BASE + 8) + gas(SPACE_IO, GPE0_LEN * 8, GPE0_BLK) + bytes(12)
    out = table("FACP", FADT_REVISION, body, strings)
    assert len(out) == FADT_V3_LEN
    return out


def madt(platform: Platform, strings: FirmwareStrings) -> bytes:
    body = struct.pack("<II", platform.local_apic, MADT_PCAT_COMPAT)
    for cpu in range(platform.cpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)           # Processor Local APIC, enabled
    for index, ioapic in enumerate(platform.ioapics):
        body += struct.pack("<BBBBII", 1, 12, ioapic.ident, 0, ioapic.range.start, index * IOAPIC_PINS)
    if platform.ioapics:
        body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)           # IRQ0 -> GSI 2, bus defaults
        for irq in PCI_IRQS:
            body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, ISO_LEVEL_HIGH)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)                 # LINT1 is NMI on every CPU
    return table("APIC", 1, body, strings)


def hpet(platform: Platform, strings: FirmwareStrings) -> bytes:
    assert platform.hpet is not None
    body = struct.pack("<I", HPET_BLOCK_ID) + gas(SPACE_MEMORY, 0, platform.hpet.start) + struct.pack("<BHB", 0, 0, 0)
    return table("HPET", 1, body, strings)


def mcfg(platform: Platform, strings: FirmwareStrings) -> bytes:
    body = bytes(8)
    for seg in platform.pci_segments:
        body += struct.pack("<QHBBI", seg.base, seg.segment, seg.bus_start, seg.bus_end, 0)
    return table("MCFG", 1, body, strings)


def waet(strings: FirmwareStrings) -> bytes:
    return table("WAET", 1, struct.pack("<I", WAET_PM_TIMER_GOOD), strings)


def rsdp(strings: FirmwareStrings, rsdt_at: int, xsdt_at: int) -> bytes:
    """Root System Description Pointer, revision 2: both checksums."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, _pad(strings.acpi_oem_id, 6), 2, rsdt_at,
                                 RSDP_V2_LEN, xsdt_at, 0))
    fix_checksum(data, 8, 0, RSDP_V1_LEN)
    fix_checksum(data, 32)
    return bytes(data)


def sysfs_names(signatures: list[str]) -> list[str]:
    """drivers/acpi/sysfs.c acpi_table_attr_init(): SIG, or SIG1, SIG2, ... when repeated."""
    names = []
    for i, sig in enumerate(signatures):
        total = signatures.count(sig)
        names.append(sig if total == 1 else f"{sig}{signatures[:i + 1].count(sig)}")
    return names


@dataclass(frozen=True)
class AcpiBlob:
    """The tables laid out from `base`, and the RSDP that finds them."""

    base: int
    data: bytes                  # what goes at base..base+len(data)
    tables: dict[str, bytes]     # /sys/firmware/acpi/tables/ names -> contents
    addresses: dict[str, int]    # same names (plus RSDT, XSDT) -> physical address
    rsdp: bytes


def build(platform: Platform, strings: FirmwareStrings, base: int, limit: int) -> AcpiBlob:
    """Lay the tables out in [base, limit): FACS, DSDT, FACP, APIC, HPET, MCFG, WAET, RSDT, XSDT."""
    blob = bytearray()
    at: dict[str, int] = {}
    start = -(-base // FACS_ALIGN) * FACS_ALIGN

    def put(sig: str, data: bytes) -> None:
        at[sig] = start + len(blob)
        blob.extend(data)
        if start + len(blob) > limit:
            raise FirmwareError(f"ACPI tables do not fit in {base:#x}-{limit - 1:#x}")

    put("FACS", facs())
    put("DSDT", dsdt(platform, strings))
    put("FACP", fadt(platform, strings, at["FACS"], at["DSDT"]))
    builders: list[tuple[str, Callable[[], bytes], bool]] = [
        ("APIC", lambda: madt(platform, strings), True),
        ("HPET", lambda: hpet(platform, strings), platform.hpet is not None),
        ("MCFG", lambda: mcfg(platform, strings), bool(platform.pci_segments)),
        ("WAET", lambda: waet(strings), True),
    ]
    for sig, make, wanted in builders:
        if wanted:
            put(sig, make())
    pointed = [sig for sig in at if sig not in ("FACS", "DSDT")]  # FADT points at those two
    put("RSDT", table("RSDT", 1, b"".join(struct.pack("<I", at[s]) for s in pointed), strings))
    put("XSDT", table("XSDT", 1, b"".join(struct.pack("<Q", at[s]) for s in pointed), strings))
    installed = [sig for sig in at if sig not in ("RSDT", "XSDT")]
    names = sysfs_names(installed)
    contents = {name: bytes(blob[at[sig] - start:at[sig] - start + _length(blob, at[sig] - start)])
                for name, sig in zip(names, installed)}
    return AcpiBlob(
        base=start, data=bytes(blob), tables=contents,
        addresses={**dict(zip(names, (at[s] for s in installed))), "RSDT": at["RSDT"], "XSDT": at["XSDT"]},
        rsdp=rsdp(strings, at["RSDT"], at["XSDT"]),
    )


def _length(blob: bytearray, offset: int) -> int:
    return int(struct.unpack_from("<I", blob, offset + 4)[0])
