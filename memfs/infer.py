"""Flags for resources of a captured /proc/iomem dump, inferred from names and nesting.

A dump carries no flags, so each resource gets the flags and desc the kernel
code that creates resources of that name gives them (spec 3.4; e820.c,
setup.c, pci, virtio_mem.c). The rules, first match wins:

| name (and place)                                   | flags                                   | desc            |
|----------------------------------------------------|-----------------------------------------|-----------------|
| `System RAM`                                       | SYSTEM_RAM\\|BUSY                        |                 |
| `System RAM (virtio_mem)`                          | SYSTEM_RAM\\|DRIVER_MANAGED\\|MERGEABLE\\|BUSY |          |
| `System RAM (...)` (kmem, ...)                     | SYSTEM_RAM\\|DRIVER_MANAGED\\|BUSY        |                 |
| `Kernel code/text/rodata/data/bss` under RAM       | SYSTEM_RAM\\|BUSY                        |                 |
| `Crash kernel` under RAM                           | SYSTEM_RAM\\|BUSY                        | CRASH_KERNEL    |
| `virtioN` at top level (virtio-mem container)      | SYSTEM_RAM\\|EXCLUSIVE (not busy)        |                 |
| `Reserved`, `Soft Reserved`                        | MEM, BUSY only if it starts below 1 MiB | RESERVED / SOFT_RESERVED |
| `Persistent Memory`, `... (legacy)`                | MEM, BUSY only below 1 MiB              | PERSISTENT_MEMORY(_LEGACY) |
| `ACPI Tables`, `ACPI Non-volatile Storage`         | MEM\\|BUSY                               | ACPI_TABLES / ACPI_NV_STORAGE |
| `Unusable memory`, `Unknown E820 type`, `RAM buffer`, `Video RAM area` | MEM\\|BUSY           |                 |
| `... ROM` (System, Video, Adapter)                 | MEM\\|BUSY\\|READONLY                     |                 |
| `PCI Bus ...`                                      | MEM\\|WINDOW (a bridge window, not busy) |                 |
| `PCI MMCONFIG`, `PCI ECAM`, `IOAPIC`, `HPET`, `Local APIC` ... | MEM\\|BUSY                   |                 |
| a PCI function `DDDD:BB:DD.F` (a BAR)              | MEM (not busy: its children are the driver's claims) | |
| anything else with children (a container)          | MEM                                     |                 |
| anything else without children (a driver's claim) | MEM\\|BUSY                               |                 |
"""
from __future__ import annotations

import re

from .kernel.ioport import (
    IORES_DESC_ACPI_NV_STORAGE,
    IORES_DESC_ACPI_TABLES,
    IORES_DESC_CRASH_KERNEL,
    IORES_DESC_NONE,
    IORES_DESC_PERSISTENT_MEMORY,
    IORES_DESC_PERSISTENT_MEMORY_LEGACY,
    IORES_DESC_RESERVED,
    IORES_DESC_SOFT_RESERVED,
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_MEM,
    IORESOURCE_READONLY,
    IORESOURCE_SYSRAM,
    IORESOURCE_SYSRAM_DRIVER_MANAGED,
    IORESOURCE_SYSRAM_MERGEABLE,
    IORESOURCE_SYSTEM_RAM,
    IORESOURCE_WINDOW,
    Resource,
)
from .kernel.resource import ResourceTree

ONE_MIB = 1 << 20
BUSY_RAM = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
VIRTIO_MEM_RAM = "System RAM (virtio_mem)"
VIRTIO_CONTAINER = re.compile(r"virtio\d+")
KERNEL_IMAGE = {"Kernel code", "Kernel text", "Kernel rodata", "Kernel data", "Kernel bss"}
PCI_FUNCTION = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")

# name -> (flags, desc, busy only below 1 MiB)
_BY_NAME: dict[str, tuple[int, int, bool]] = {
    "Reserved": (IORESOURCE_MEM, IORES_DESC_RESERVED, True),
    "Soft Reserved": (IORESOURCE_MEM, IORES_DESC_SOFT_RESERVED, True),
    "Persistent Memory": (IORESOURCE_MEM, IORES_DESC_PERSISTENT_MEMORY, True),
    "Persistent Memory (legacy)": (IORESOURCE_MEM, IORES_DESC_PERSISTENT_MEMORY_LEGACY, True),
    "ACPI Tables": (IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_ACPI_TABLES, False),
    "ACPI Non-volatile Storage": (IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_ACPI_NV_STORAGE, False),
    "Unusable memory": (IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE, False),
    "Unknown E820 type": (IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE, False),
    "RAM buffer": (IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE, False),
    "Video RAM area": (IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE, False),
}


def infer_flags(tree: ResourceTree) -> None:
    """Assign flags, desc and name identity to every resource of a parsed dump."""
    for r, depth in tree.walk():
        tree.set_flags(r, *_infer(r, depth))
        if r.name == VIRTIO_MEM_RAM:
            # One name pointer per virtio-mem device: blocks of one device merge.
            r.name_id = r.parent


def _infer(r: Resource, depth: int) -> tuple[int, int]:
    name = r.name or ""
    parent_is_ram = r.parent is not None and bool(r.parent.flags & IORESOURCE_SYSRAM)
    if name == "System RAM":
        return BUSY_RAM, IORES_DESC_NONE
    if name == VIRTIO_MEM_RAM:
        return BUSY_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED | IORESOURCE_SYSRAM_MERGEABLE, IORES_DESC_NONE
    if name.startswith("System RAM (") and name.endswith(")"):
        return BUSY_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED, IORES_DESC_NONE
    if parent_is_ram and name in KERNEL_IMAGE:
        return BUSY_RAM, IORES_DESC_NONE
    if parent_is_ram and name == "Crash kernel":
        return BUSY_RAM, IORES_DESC_CRASH_KERNEL
    if depth == 0 and VIRTIO_CONTAINER.fullmatch(name):
        return IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE, IORES_DESC_NONE
    if name in _BY_NAME:
        flags, desc, low_busy = _BY_NAME[name]
        if low_busy and r.start < ONE_MIB:
            flags |= IORESOURCE_BUSY
        return flags, desc
    if name.endswith(" ROM"):
        return IORESOURCE_MEM | IORESOURCE_BUSY | IORESOURCE_READONLY, IORES_DESC_NONE
    if name.startswith("PCI Bus"):
        return IORESOURCE_MEM | IORESOURCE_WINDOW, IORES_DESC_NONE
    if name.startswith(("PCI MMCONFIG", "PCI ECAM", "IOAPIC ", "HPET ", "Local APIC")):
        return IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE
    if PCI_FUNCTION.fullmatch(name) or r.children:
        return IORESOURCE_MEM, IORES_DESC_NONE
    return IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE
