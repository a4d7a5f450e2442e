"""Flags for resources of a captured /proc/iomem dump, inferred from names and nesting.

A dump carries no flags, so each resource gets the flags and desc that the kernel code
which creates resources of that name gives them. Two ways of creating them recur:

* *requested*: `__request_region()` (kernel/resource.c) makes the resource BUSY, takes its
  type and SYSRAM bits (`resource_type() | resource_ext_type()`) and its desc from the
  parent it lands in, and ORs in the caller's flags; some callers then clear BUSY again;
* *inserted*: `insert_resource()` / `request_resource()` link a resource with the flags and
  desc its creator filled in, busy or not.

The rules, first match wins ("parent" is the line the resource is nested under; at top
level the root, `iomem_resource`: MEM, desc NONE):

| #  | name (and place) | flags | desc | decided by (Linux 6.1) |
|----|------------------|-------|------|------------------------|
| 1  | `System RAM` | SYSTEM_RAM\\|BUSY | NONE | e820.c: `e820_type_to_iomem_type()` RAM -> IORESOURCE_SYSTEM_RAM, `do_mark_busy()` true; arm64 setup.c `request_standard_resources()` |
| 2  | `System RAM (virtio_mem)` | requested: SYSTEM_RAM\\|DRIVER_MANAGED\\|MERGEABLE\\|BUSY | parent's | memory_hotplug.c `register_memory_resource()` (DRIVER_MANAGED for any name but "System RAM"); virtio_mem.c adds with MHP_MERGE_RESOURCE, so `merge_system_ram_resource()` sets MERGEABLE |
| 3  | `System RAM (<driver>)`, e.g. `System RAM (kmem)` | requested: SYSTEM_RAM\\|DRIVER_MANAGED\\|BUSY | parent's | `register_memory_resource()`; dax/kmem.c `add_memory_driver_managed()` without MHP_MERGE_RESOURCE |
| 4  | `Kernel code`, `Kernel text`, `Kernel rodata`, `Kernel data`, `Kernel bss` | SYSTEM_RAM\\|BUSY | NONE | x86 setup.c `code_resource` ... `bss_resource`; arm/arm64 setup.c `kernel_code`, `kernel_data` |
| 5  | `Crash kernel` | SYSTEM_RAM\\|BUSY | CRASH_KERNEL | crash_core.c `crashk_res`, `crashk_low_res` |
| 6  | `virtioN` at top level, or holding a `System RAM (virtio_mem)` | requested: SYSTEM_RAM\\|EXCLUSIVE, BUSY cleared | parent's | virtio_mem.c `virtio_mem_create_resource()`: `__request_mem_region(..., IORESOURCE_SYSTEM_RAM \\| IORESOURCE_EXCLUSIVE)`, then `flags &= ~IORESOURCE_BUSY` |
| 7  | `daxR.N` holding a `System RAM (kmem)` | requested, then SYSTEM_RAM (not busy) | parent's | dax/kmem.c `dev_dax_kmem_probe()`: `request_mem_region()`, then `res->flags = IORESOURCE_SYSTEM_RAM` |
| 8  | `CXL Window N` | MEM | CXL | cxl/acpi.c `add_cxl_resources()` (`insert_resource_expand_to_fit()`) |
| 9  | `regionN` under a `CXL Window` | MEM | NONE | cxl/core/region.c `alloc_hpa()` -> `alloc_free_mem_region()`: inserted IORESOURCE_MEM, IORES_DESC_NONE |
| 10 | `Reserved` or `reserved` under System RAM | MEM\\|BUSY | NONE | `reserve_region_with_split()`: `resource_type(root) \\| IORESOURCE_BUSY`; arm64/riscv `reserve_memblock_reserved_regions()` |
| 11 | `Reserved`, `Soft Reserved`, `Persistent Memory`, `Persistent Memory (legacy)`, `reserved` | MEM, BUSY only if it starts below 1 MiB | RESERVED, SOFT_RESERVED, PERSISTENT_MEMORY, PERSISTENT_MEMORY_LEGACY, NONE | e820.c `do_mark_busy()`: below 1 MiB always, else false for these types; `reserved` is the pre-rename e820 name and arm64's nomap RAM (flags IORESOURCE_MEM) |
| 12 | `ACPI Tables`, `ACPI Non-volatile Storage`, `Unusable memory`, `Unknown E820 type` | MEM\\|BUSY | ACPI_TABLES, ACPI_NV_STORAGE, NONE, NONE | e820.c `e820_type_to_iores_desc()`, `do_mark_busy()` true |
| 13 | `RAM buffer` | MEM\\|BUSY | NONE | e820.c `e820__reserve_resources_late()` -> `reserve_region_with_split()` |
| 14 | `Video RAM area` | MEM\\|BUSY | NONE | x86 setup.c `video_ram_resource` |
| 15 | `... ROM` (`System ROM`, `Video ROM`, `Adapter ROM`) | MEM\\|BUSY\\|READONLY | NONE | x86 probe_roms.c |
| 16 | `PCI Bus ...` | MEM\\|WINDOW (not busy) | NONE | pci_root.c `acpi_pci_root_create()` / probe.c bridge windows ("PCI Bus %04x:%02x") |
| 17 | `PCI MMCONFIG ...`, `PCI ECAM ...` | MEM\\|BUSY | NONE | x86 pci/mmconfig-shared.c `pci_mmconfig_alloc()`; pci/ecam.c `pci_ecam_create()` |
| 18 | `IOAPIC N` | MEM\\|BUSY | NONE | apic/io_apic.c `ioapic_setup_resources()` |
| 19 | `Local APIC` | MEM\\|BUSY | NONE | apic/apic.c `lapic_resource` |
| 20 | `HPET N` | MEM (not busy) | NONE | acpi/boot.c `acpi_parse_hpet()`: `hpet_res->flags = IORESOURCE_MEM`; `hpet_insert_resource()` |
| 21 | `pnp BB:DD` | requested, BUSY cleared | parent's | pnp/system.c `reserve_range()`: `request_mem_region()`, then `res->flags &= ~IORESOURCE_BUSY` |
| 22 | a platform device: ACPI `HID:nn` (`PNP0103:00`, `INT0800:00`, `ACPI0007:00`) or `name.N.auto`, unless its parent has the same name (then rule 24/25: the driver's claim) | MEM (not busy) | NONE | base/platform.c `platform_device_add()`: `insert_resource()` with the device's flags (acpi/resource.c `acpi_dev_memresource_flags()`: IORESOURCE_MEM); acpi_platform.c names it `dev_name(&adev->dev)` ("%s:%02x", scan.c) |
| 23 | a PCI function `DDDD:BB:DD.F` (a BAR), unless its parent has the same name (then rule 24/25) | MEM (not busy) | NONE | pci/setup-res.c `pci_claim_resource()`: `request_resource()` of the BAR, named `pci_name()` |
| 24 | anything else with children | MEM (not busy) | NONE | a bus or firmware container (`insert_resource()`), e.g. DT nodes, `hmem.N`, `pcie@...` |
| 25 | anything else without children | requested: BUSY | parent's | a driver's `request_mem_region()` / `pci_request_region()` / `devm_ioremap_resource()` |

A virtio-mem device's `System RAM (virtio_mem)` resources also share one name pointer per
device (`name_id`), so that only blocks of the same device merge (rule 2).
"""
from __future__ import annotations

import re

from .kernel.ioport import (
    IORES_DESC_ACPI_NV_STORAGE,
    IORES_DESC_ACPI_TABLES,
    IORES_DESC_CRASH_KERNEL,
    IORES_DESC_CXL,
    IORES_DESC_NONE,
    IORES_DESC_PERSISTENT_MEMORY,
    IORES_DESC_PERSISTENT_MEMORY_LEGACY,
    IORES_DESC_RESERVED,
    IORES_DESC_SOFT_RESERVED,
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_EXT_TYPE_BITS,
    IORESOURCE_MEM,
    IORESOURCE_READONLY,
    IORESOURCE_SYSRAM,
    IORESOURCE_SYSRAM_DRIVER_MANAGED,
    IORESOURCE_SYSRAM_MERGEABLE,
    IORESOURCE_SYSTEM_RAM,
    IORESOURCE_TYPE_BITS,
    IORESOURCE_WINDOW,
    Resource,
)
from .kernel.resource import ResourceTree
from .kernel.sizes import SZ_1M

Flags = tuple[int, int]  # (flags, desc)

SYSTEM_RAM = "System RAM"
VIRTIO_MEM_RAM = "System RAM (virtio_mem)"
KMEM_RAM = "System RAM (kmem)"
KERNEL_IMAGE = frozenset({"Kernel code", "Kernel text", "Kernel rodata", "Kernel data", "Kernel bss"})
VIRTIO_DEVICE = re.compile(r"virtio\d+")
DAX_DEVICE = re.compile(r"dax\d+\.\d+")
CXL_WINDOW = re.compile(r"CXL Window \d+")
CXL_REGION = re.compile(r"region\d+")
HPET = re.compile(r"HPET \d+")
IOAPIC = re.compile(r"IOAPIC \d+")
PNP_DEVICE = re.compile(r"pnp [0-9a-f]{2}:[0-9a-f]{2}")
# acpi_device_hid() (a PNP ID: 3 letters + 4 hex digits, or an ACPI ID: 4 characters + 4 hex
# digits) and the instance number, "%s:%02x"; and platform_device_add()'s "%s.%d.auto".
PLATFORM_DEVICE = re.compile(r"(?:[A-Z]{3}|[A-Z0-9_]{4})[0-9A-F]{4}:[0-9a-f]{2,}|\S+\.\d+\.auto")
PCI_FUNCTION = re.compile(r"[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")

# e820.c: name -> desc, for the types do_mark_busy() leaves non-busy above 1 MiB (rule 11)
_E820_LOW_BUSY = {
    "Reserved": IORES_DESC_RESERVED,
    "Soft Reserved": IORES_DESC_SOFT_RESERVED,
    "Persistent Memory": IORES_DESC_PERSISTENT_MEMORY,
    "Persistent Memory (legacy)": IORES_DESC_PERSISTENT_MEMORY_LEGACY,
    "reserved": IORES_DESC_NONE,
}
# name -> desc, for resources created MEM|BUSY whatever their address (rules 12-14, 17-19)
_MEM_BUSY = {
    "ACPI Tables": IORES_DESC_ACPI_TABLES,
    "ACPI Non-volatile Storage": IORES_DESC_ACPI_NV_STORAGE,
    "Unusable memory": IORES_DESC_NONE,
    "Unknown E820 type": IORES_DESC_NONE,
    "RAM buffer": IORES_DESC_NONE,
    "Video RAM area": IORES_DESC_NONE,
    "Local APIC": IORES_DESC_NONE,
}


def infer_flags(tree: ResourceTree) -> None:
    """Assign flags, desc and name identity to every resource of a parsed dump.

    The walk is pre-order, so a parent's flags are final before its children's rules read them.
    """
    for r, depth in tree.walk():
        tree.set_flags(r, *infer(r, depth))
        if r.name == VIRTIO_MEM_RAM:
            # One name pointer per virtio-mem device: blocks of one device merge.
            r.name_id = r.parent


def infer(r: Resource, depth: int) -> Flags:
    """(flags, desc) for `r`, at `depth` (0 = top level), by the first rule of the table that matches."""
    name = r.name or ""
    parent = r.parent
    children = {c.name for c in r.children}
    parent_name = parent.name if parent is not None and depth > 0 else None
    under_ram = parent is not None and depth > 0 and bool(parent.flags & IORESOURCE_SYSRAM)
    if name == SYSTEM_RAM:  # 1
        return IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY, IORES_DESC_NONE
    if name == VIRTIO_MEM_RAM:  # 2
        return _requested(r, IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED | IORESOURCE_SYSRAM_MERGEABLE)
    if name.startswith("System RAM (") and name.endswith(")"):  # 3
        return _requested(r, IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED)
    if name in KERNEL_IMAGE:  # 4
        return IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY, IORES_DESC_NONE
    if name == "Crash kernel":  # 5
        return IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY, IORES_DESC_CRASH_KERNEL
    if VIRTIO_DEVICE.fullmatch(name) and (depth == 0 or VIRTIO_MEM_RAM in children):  # 6
        flags, desc = _requested(r, IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE)
        return flags & ~IORESOURCE_BUSY, desc
    if DAX_DEVICE.fullmatch(name) and KMEM_RAM in children:  # 7
        return IORESOURCE_SYSTEM_RAM, _requested(r, 0)[1]
    if CXL_WINDOW.fullmatch(name):  # 8
        return IORESOURCE_MEM, IORES_DESC_CXL
    if CXL_REGION.fullmatch(name) and parent_name is not None and CXL_WINDOW.fullmatch(parent_name):  # 9
        return IORESOURCE_MEM, IORES_DESC_NONE
    if name in ("Reserved", "reserved") and under_ram:  # 10
        return IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE
    if name in _E820_LOW_BUSY:  # 11
        return IORESOURCE_MEM | (IORESOURCE_BUSY if r.start < SZ_1M else 0), _E820_LOW_BUSY[name]
    if name in _MEM_BUSY:  # 12, 13, 14, 19
        return IORESOURCE_MEM | IORESOURCE_BUSY, _MEM_BUSY[name]
    if name.endswith(" ROM"):  # 15
        return IORESOURCE_MEM | IORESOURCE_BUSY | IORESOURCE_READONLY, IORES_DESC_NONE
    if name.startswith("PCI Bus"):  # 16
        return IORESOURCE_MEM | IORESOURCE_WINDOW, IORES_DESC_NONE
    if name.startswith(("PCI MMCONFIG", "PCI ECAM")) or IOAPIC.fullmatch(name):  # 17, 18
        return IORESOURCE_MEM | IORESOURCE_BUSY, IORES_DESC_NONE
    if HPET.fullmatch(name):  # 20
        return IORESOURCE_MEM, IORES_DESC_NONE
    if PNP_DEVICE.fullmatch(name):  # 21
        flags, desc = _requested(r, 0)
        return flags & ~IORESOURCE_BUSY, desc
    if (PLATFORM_DEVICE.fullmatch(name) or PCI_FUNCTION.fullmatch(name)) and name != parent_name:  # 22, 23
        return IORESOURCE_MEM, IORES_DESC_NONE
    if r.children:  # 24
        return IORESOURCE_MEM, IORES_DESC_NONE
    return _requested(r, 0)  # 25


def _requested(r: Resource, flags: int) -> Flags:
    """__request_region(): the parent's type and SYSRAM bits and desc, BUSY, and the caller's flags."""
    parent = r.parent
    if parent is None:  # not linked: as if requested from iomem_resource
        return IORESOURCE_MEM | IORESOURCE_BUSY | flags, IORES_DESC_NONE
    inherited = parent.flags & (IORESOURCE_TYPE_BITS | IORESOURCE_EXT_TYPE_BITS)
    return inherited | IORESOURCE_BUSY | flags, parent.desc
