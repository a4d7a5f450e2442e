"""Firmware for the simulated x86 PC: BIOS data, option ROMs, SMBIOS and ACPI tables.

`platform_from_tree()` reads the memory map off a /proc/iomem tree (None for
anything but an x86 PC layout); `build_firmware()` lays out what a QEMU q35
VM with SeaBIOS has in memory there and what Linux exports of it under
/sys/firmware. Pure data: nothing here touches FUSE or the memory model.
"""
from .image import Firmware, build_firmware
from .platform import FirmwareError, FirmwareStrings, IoApic, PciSegment, Platform, Range, platform_from_tree

__all__ = [
    "Firmware", "FirmwareError", "FirmwareStrings", "IoApic", "PciSegment", "Platform", "Range",
    "build_firmware", "platform_from_tree",
]
