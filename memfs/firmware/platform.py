"""What the firmware needs to know about the machine, read off its /proc/iomem tree.

A QEMU q35 (or i440fx) VM booted by SeaBIOS leaves these resources in
/proc/iomem, each created by the kernel code named:

resource (name)                        created by                                  firmware here
top-level `System RAM`                 e820 RAM (arch/x86/kernel/e820.c)           BDA 0x413, SMBIOS 17/19
`Reserved` after the first RAM < 640K  e820 (SeaBIOS reserves its EBDA)            EBDA, BDA 0x40E
`Video ROM`, `Adapter ROM`             probe_roms() (arch/x86/kernel/probe_roms.c) option ROM images
`System ROM` (0xF0000-0xFFFFF)         probe_roms()                                the F-segment
`Reserved` after low RAM, `ACPI Tables` e820 (SeaBIOS's high tables / ACPI data)   ACPI tables
`IOAPIC N`                             ioapic_insert_resources() (apic/io_apic.c)  MADT I/O APIC
`HPET N`                               hpet_insert_resource() (x86/kernel/acpi/boot.c) HPET table, DSDT
`Local APIC`                           lapic_insert_resource() (apic/apic.c)       MADT
`PCI MMCONFIG SSSS [bus BB-BB]`        pci_mmcfg_late_insert_resources() (x86/pci/mmconfig-shared.c) MCFG

The CPU count is not in /proc/iomem; the caller says it (default 1).
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from ..kernel.ioport import Resource
from ..kernel.resource import ResourceTree

FOUR_GIB = 1 << 32
BASE_MEMORY_END = 0xA0000  # 640 KiB: conventional memory ends where VGA memory starts
FSEG = 0xF0000
FSEG_END = 0xFFFFF
DEFAULT_LOCAL_APIC = 0xFEE00000  # APIC_DEFAULT_PHYS_BASE

_MMCONFIG = re.compile(r"PCI MMCONFIG ([0-9a-f]{4}) \[bus ([0-9a-f]{2})-([0-9a-f]{2})\]")
_IOAPIC = re.compile(r"IOAPIC (\d+)")
_HPET = re.compile(r"HPET (\d+)")
_DATE = re.compile(r"(\d\d)/(\d\d)/(\d{4})")


class FirmwareError(ValueError):
    """Firmware that cannot be laid out in this machine's memory map."""


@dataclass(frozen=True)
class Range:
    """A physical address range, inclusive like `struct resource`."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class PciSegment:
    """One ECAM (MMCONFIG) area: PCI segment, bus range and where it is mapped."""

    range: Range
    segment: int
    bus_start: int
    bus_end: int

    @property
    def base(self) -> int:
        """The address of bus 0's configuration space, as MCFG records it."""
        return self.range.start - (self.bus_start << 20)


@dataclass(frozen=True)
class IoApic:
    range: Range
    ident: int


@dataclass(frozen=True)
class Platform:
    """The x86 PC memory map the firmware is laid out in."""

    ram: tuple[Range, ...]            # top-level System RAM (boot RAM), sorted
    system_rom: Range                 # the F-segment
    ebda: Range | None = None         # SeaBIOS's EBDA, the Reserved range below 640 KiB
    video_rom: Range | None = None
    adapter_roms: tuple[Range, ...] = ()
    acpi_area: Range | None = None    # where SeaBIOS put the ACPI tables (and big SMBIOS tables)
    ioapics: tuple[IoApic, ...] = ()
    hpet: Range | None = None
    local_apic: int = DEFAULT_LOCAL_APIC
    pci_segments: tuple[PciSegment, ...] = ()
    cpus: int = 1

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.cpus > 255:
            raise FirmwareError(f"cpus must be 1..255 (xAPIC ids), not {self.cpus}")
        if not self.ram:
            raise FirmwareError("no System RAM")

    @property
    def base_memory_kib(self) -> int:
        """Conventional memory in KiB (BDA 0x413): up to the EBDA or the end of the first RAM range."""
        if self.ebda is not None:
            return self.ebda.start // 1024
        first = self.ram[0]
        return min(first.end + 1, BASE_MEMORY_END) // 1024 if first.start < BASE_MEMORY_END else 0

    @property
    def memory_blocks(self) -> tuple[Range, ...]:
        """The RAM QEMU gave the VM, as its e820 RAM entries (and SMBIOS type 19) list it.

        Below 4 GiB one block from 0 to the end of low RAM, holes included, up to
        the end of the ACPI area when that directly follows it (SeaBIOS carved
        it out of RAM); above 4 GiB the System RAM ranges, adjacent ones merged.
        """
        low = [r for r in self.ram if r.end < FOUR_GIB]
        blocks: list[Range] = []
        if low:
            top = max(r.end for r in low)
            if self.acpi_area is not None and self.acpi_area.start == top + 1 and self.acpi_area.end < FOUR_GIB:
                top = self.acpi_area.end
            blocks.append(Range(0, top))
        for r in self.ram:
            if r.end < FOUR_GIB:
                continue
            if blocks and blocks[-1].end + 1 == r.start and blocks[-1].start >= FOUR_GIB:
                blocks[-1] = Range(blocks[-1].start, r.end)
            else:
                blocks.append(Range(max(r.start, FOUR_GIB), r.end))
        return tuple(blocks)

    @property
    def memory_size(self) -> int:
        """Boot RAM in bytes: what `-m` gave the VM (the sum of memory_blocks)."""
        return sum(b.size for b in self.memory_blocks)


@dataclass(frozen=True)
class FirmwareStrings:
    """Identity strings a machine file can set; defaults are a Debian 12 QEMU 7.2 q35 VM.

    An empty string leaves the SMBIOS field unset (dmidecode: "Not Specified").
    """

    bios_vendor: str = "SeaBIOS"
    bios_version: str = "1.16.2-debian-1.16.2-1"
    bios_date: str = "04/01/2014"  # MM/DD/YYYY, SeaBIOS's BIOS_DATE
    system_manufacturer: str = "QEMU"
    system_product: str = "Standard PC (Q35 + ICH9, 2009)"
    system_version: str = "pc-q35-7.2"
    system_serial: str = ""
    system_uuid: str = ""  # empty: QEMU without -uuid (all zero, dmidecode "Not Settable")
    acpi_oem_id: str = "BOCHS"
    acpi_oem_table_id: str = "BXPC"

    def __post_init__(self) -> None:
        for name in ("bios_vendor", "bios_version", "bios_date", "system_manufacturer", "system_product",
                     "system_version", "system_serial", "system_uuid", "acpi_oem_id", "acpi_oem_table_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.isascii() or "\0" in value:
                raise FirmwareError(f"{name} must be ASCII text without NUL, not {value!r}")
        if not _DATE.fullmatch(self.bios_date):
            raise FirmwareError(f"bios_date must be MM/DD/YYYY, not {self.bios_date!r}")
        if self.system_uuid:
            try:
                uuid.UUID(self.system_uuid)
            except ValueError as e:
                raise FirmwareError(f"system_uuid {self.system_uuid!r}: {e}") from None
        if len(self.acpi_oem_id) > 6 or len(self.acpi_oem_table_id) > 8:
            raise FirmwareError("acpi_oem_id is at most 6 characters, acpi_oem_table_id at most 8")

    @property
    def uuid_bytes(self) -> bytes:
        """SMBIOS 2.6+ UUID encoding (first three fields little-endian), zeros if unset."""
        return uuid.UUID(self.system_uuid).bytes_le if self.system_uuid else bytes(16)


def _range(r: Resource) -> Range:
    return Range(r.start, r.end)


def _is_reserved(r: Resource) -> bool:
    return (r.name or "").lower() == "reserved"  # older kernels print "reserved"


def platform_from_tree(tree: ResourceTree, cpus: int = 1) -> Platform | None:
    """The Platform of an x86 PC dump, or None when the tree has no F-segment System ROM."""
    top = [r for r in tree.root.children if r.end >= r.start]
    everything = [r for r, _depth in tree.walk() if r.end >= r.start]
    system_rom = next((r for r in everything if r.name == "System ROM" and r.start <= FSEG and r.end >= FSEG_END),
                      None)
    ram = sorted((_range(r) for r in top if r.name == "System RAM"), key=lambda r: r.start)
    if system_rom is None or not ram:
        return None

    ebda = None
    if ram[0].start < BASE_MEMORY_END:
        ebda = next((_range(r) for r in top if _is_reserved(r) and r.start == ram[0].end + 1
                     and r.end < BASE_MEMORY_END), None)

    acpi_area = next((_range(r) for r in top if r.name == "ACPI Tables" and r.end < FOUR_GIB), None)
    low_ram = [r for r in ram if r.end < FOUR_GIB]
    if acpi_area is None and low_ram:
        low_top = max(r.end for r in low_ram)
        acpi_area = next((_range(r) for r in top if _is_reserved(r) and r.start == low_top + 1
                          and r.end < FOUR_GIB), None)

    ioapics = []
    pci_segments = []
    hpet = None
    local_apic = DEFAULT_LOCAL_APIC
    for r in everything:
        name = r.name or ""
        if m := _IOAPIC.fullmatch(name):
            ioapics.append(IoApic(_range(r), int(m.group(1))))
        elif (m := _HPET.fullmatch(name)) and hpet is None:
            hpet = _range(r)
        elif name == "Local APIC":
            local_apic = r.start
        elif m := _MMCONFIG.fullmatch(name):
            seg, first, last = (int(g, 16) for g in m.groups())
            pci_segments.append(PciSegment(_range(r), seg, first, last))

    roms = [r for r in top if r.end < FSEG]
    video = next((_range(r) for r in roms if r.name == "Video ROM"), None)
    adapters = tuple(sorted((_range(r) for r in roms if r.name == "Adapter ROM"), key=lambda r: r.start))
    return Platform(
        ram=tuple(ram), system_rom=_range(system_rom), ebda=ebda, video_rom=video, adapter_roms=adapters,
        acpi_area=acpi_area, ioapics=tuple(sorted(ioapics, key=lambda a: a.ident)), hpet=hpet,
        local_apic=local_apic, pci_segments=tuple(pci_segments), cpus=cpus,
    )
