"""memfs.infer: flags and desc for a dump's resources, one table row per rule of the module docstring.

Every expected value here was written from the kernel code that creates resources of that
name (the "decided by" column of memfs/infer.py's table), not from what memfs.infer returns.
"""
from __future__ import annotations

import re

import pytest

from conftest import DUMPS, QEMU_Q35_2G
from memfs import infer as infer_module
from memfs.infer import infer_flags
from memfs.kernel.iomem import parse
from memfs.kernel.ioport import (
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_SYSRAM_MERGEABLE,
    IORESOURCE_SYSTEM_RAM,
    IORESOURCE_TYPE_BITS,
    IORESOURCE_MEM,
    flag_names,
    parse_desc,
    parse_flags,
)
from memfs.kernel.resource import ResourceTree


def inferred(text: str) -> ResourceTree:
    tree = parse(text)
    infer_flags(tree)
    return tree


def find(tree: ResourceTree, line: str):
    """The resource printed as `line` (`START-END : NAME`, no indentation)."""
    span, _, name = line.partition(" : ")
    start, end = (int(x, 16) for x in span.split("-"))
    hits = [r for r, _ in tree.walk() if (r.start, r.end, r.name) == (start, end, name)]
    assert len(hits) == 1, f"{line!r} appears {len(hits)} times"
    return hits[0]


def shown(flags: int, desc: int) -> tuple[str, int]:
    return flag_names(flags), desc


# ---------------------------------------------------------------------------------------
# One row (or more) per rule: (rule number, dump, the line to look at, flags, desc).
# Dumps are as the kernel prints them; the looked-at line is given without indentation.

LOW = "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
RAM = "00100000-7fffffff : System RAM\n"

RULES = [
    # 1 e820 RAM: IORESOURCE_SYSTEM_RAM, do_mark_busy() true
    (1, RAM, "00100000-7fffffff : System RAM", "SYSTEM_RAM|BUSY", "NONE"),
    (1, LOW, "00001000-0009fbff : System RAM", "SYSTEM_RAM|BUSY", "NONE"),
    # 2 register_memory_resource() + MHP_MERGE_RESOURCE -> merge_system_ram_resource()
    (2, "100000000-1ffffffff : virtio0\n  100000000-13fffffff : System RAM (virtio_mem)\n",
     "100000000-13fffffff : System RAM (virtio_mem)", "SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|SYSRAM_MERGEABLE|BUSY", "NONE"),
    # 3 register_memory_resource(), no merge; desc from the parent it was requested in
    (3, "280000000-47fffffff : Soft Reserved\n  280000000-47fffffff : dax0.0\n"
        "    280000000-47fffffff : System RAM (kmem)\n",
     "280000000-47fffffff : System RAM (kmem)", "SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|BUSY", "SOFT_RESERVED"),
    (3, "1050000000-304fffffff : CXL Window 0\n  1050000000-304fffffff : region0\n"
        "    1050000000-304fffffff : dax0.0\n      1050000000-304fffffff : System RAM (kmem)\n",
     "1050000000-304fffffff : System RAM (kmem)", "SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|BUSY", "NONE"),
    # 4 setup.c code_resource & co.: IORESOURCE_BUSY | IORESOURCE_SYSTEM_RAM
    (4, RAM + "  01000000-01e01d31 : Kernel code\n", "01000000-01e01d31 : Kernel code", "SYSTEM_RAM|BUSY", "NONE"),
    (4, RAM + "  02000000-028eafff : Kernel rodata\n", "02000000-028eafff : Kernel rodata", "SYSTEM_RAM|BUSY", "NONE"),
    (4, RAM + "  02a00000-02c4897f : Kernel data\n", "02a00000-02c4897f : Kernel data", "SYSTEM_RAM|BUSY", "NONE"),
    (4, RAM + "  03310000-043fffff : Kernel bss\n", "03310000-043fffff : Kernel bss", "SYSTEM_RAM|BUSY", "NONE"),
    (4, "30000000-31ffffff : System RAM\n  30022000-302834d7 : Kernel text\n", "30022000-302834d7 : Kernel text",
     "SYSTEM_RAM|BUSY", "NONE"),
    # ... static flags, wherever the dump prints them (a driver's claim at top level would be MEM|BUSY)
    *[(4, f"01000000-01e01d31 : {n}\n", f"01000000-01e01d31 : {n}", "SYSTEM_RAM|BUSY", "NONE")
      for n in ("Kernel code", "Kernel text", "Kernel rodata", "Kernel data", "Kernel bss")],
    # 5 crashk_res: IORESOURCE_BUSY | IORESOURCE_SYSTEM_RAM, IORES_DESC_CRASH_KERNEL
    (5, RAM + "  6f000000-7effffff : Crash kernel\n", "6f000000-7effffff : Crash kernel", "SYSTEM_RAM|BUSY",
     "CRASH_KERNEL"),
    # 6 virtio_mem_create_resource(): SYSTEM_RAM|EXCLUSIVE requested, then BUSY cleared
    (6, "100000000-1ffffffff : virtio0\n  100000000-13fffffff : System RAM (virtio_mem)\n",
     "100000000-1ffffffff : virtio0", "SYSTEM_RAM|EXCLUSIVE", "NONE"),
    (6, "140000000-33fffffff : virtio1\n", "140000000-33fffffff : virtio1", "SYSTEM_RAM|EXCLUSIVE", "NONE"),
    (6, "2000000000-20ffffffff : Reserved\n  2000000000-203fffffff : virtio7\n"
        "    2000000000-2007ffffff : System RAM (virtio_mem)\n",
     "2000000000-203fffffff : virtio7", "SYSTEM_RAM|EXCLUSIVE", "RESERVED"),
    # ... a virtioN inside a BAR is virtio-fs's DAX window (devm_request_mem_region): rule 25
    (25, "c0000000-febfffff : PCI Bus 0000:00\n  e0000000-efffffff : 0000:00:04.0\n"
         "    e0000000-efffffff : virtio2\n",
     "e0000000-efffffff : virtio2", "MEM|BUSY", "NONE"),
    # 7 dev_dax_kmem_probe(): request_mem_region(), then res->flags = IORESOURCE_SYSTEM_RAM
    (7, "280000000-47fffffff : Soft Reserved\n  280000000-47fffffff : dax0.0\n"
        "    280000000-47fffffff : System RAM (kmem)\n",
     "280000000-47fffffff : dax0.0", "SYSTEM_RAM", "SOFT_RESERVED"),
    # ... a device-dax in devdax mode: dev_dax_probe()'s devm_request_mem_region(): rule 25
    (25, "280000000-47fffffff : Soft Reserved\n  280000000-47fffffff : dax1.0\n",
     "280000000-47fffffff : dax1.0", "MEM|BUSY", "SOFT_RESERVED"),
    # 8 add_cxl_resources(): IORESOURCE_MEM, IORES_DESC_CXL
    (8, "1050000000-304fffffff : CXL Window 0\n", "1050000000-304fffffff : CXL Window 0", "MEM", "CXL"),
    (8, "1050000000-304fffffff : CXL Window 0\n  1050000000-304fffffff : region0\n",
     "1050000000-304fffffff : CXL Window 0", "MEM", "CXL"),
    # 9 alloc_free_mem_region(): inserted IORESOURCE_MEM, IORES_DESC_NONE (even with nothing in it yet)
    (9, "1050000000-304fffffff : CXL Window 0\n  1050000000-104fffffff : region3\n",
     "1050000000-104fffffff : region3", "MEM", "NONE"),
    (25, "fe000000-fe00ffff : region3\n", "fe000000-fe00ffff : region3", "MEM|BUSY", "NONE"),
    # 10 reserve_region_with_split(): resource_type(root) | IORESOURCE_BUSY, IORES_DESC_NONE
    (10, "40000000-7fffffff : System RAM\n  41470000-4158ffff : reserved\n", "41470000-4158ffff : reserved",
     "MEM|BUSY", "NONE"),
    (10, "80000000-ffffffff : System RAM\n  80000000-8001ffff : Reserved\n", "80000000-8001ffff : Reserved",
     "MEM|BUSY", "NONE"),
    # 11 e820: MEM, busy only if it starts below 1 MiB (do_mark_busy)
    (11, LOW, "00000000-00000fff : Reserved", "MEM|BUSY", "RESERVED"),
    (11, "000f0000-000fffff : Reserved\n  000f0000-000fffff : System ROM\n", "000f0000-000fffff : Reserved",
     "MEM|BUSY", "RESERVED"),
    (11, "7ffe0000-7fffffff : Reserved\n", "7ffe0000-7fffffff : Reserved", "MEM", "RESERVED"),
    (11, "000fffff-0010ffff : Reserved\n", "000fffff-0010ffff : Reserved", "MEM|BUSY", "RESERVED"),
    (11, "00100000-0010ffff : Reserved\n", "00100000-0010ffff : Reserved", "MEM", "RESERVED"),
    (11, "280000000-47fffffff : Soft Reserved\n", "280000000-47fffffff : Soft Reserved", "MEM", "SOFT_RESERVED"),
    (11, "480000000-67fffffff : Persistent Memory\n", "480000000-67fffffff : Persistent Memory", "MEM",
     "PERSISTENT_MEMORY"),
    (11, "480000000-67fffffff : Persistent Memory (legacy)\n", "480000000-67fffffff : Persistent Memory (legacy)",
     "MEM", "PERSISTENT_MEMORY_LEGACY"),
    (11, "0009fc00-0009ffff : reserved\n", "0009fc00-0009ffff : reserved", "MEM|BUSY", "NONE"),
    (11, "fed1c000-fed1ffff : reserved\n", "fed1c000-fed1ffff : reserved", "MEM", "NONE"),
    # 12 e820 ACPI / NVS / UNUSABLE / unknown types: do_mark_busy() true
    (12, "7fe00000-7fefffff : ACPI Tables\n", "7fe00000-7fefffff : ACPI Tables", "MEM|BUSY", "ACPI_TABLES"),
    (12, "7ff00000-7fffffff : ACPI Non-volatile Storage\n", "7ff00000-7fffffff : ACPI Non-volatile Storage",
     "MEM|BUSY", "ACPI_NV_STORAGE"),
    (12, "7f000000-7f0fffff : Unusable memory\n", "7f000000-7f0fffff : Unusable memory", "MEM|BUSY", "NONE"),
    (12, "3ffb7000-3ffb8fff : Unknown E820 type\n", "3ffb7000-3ffb8fff : Unknown E820 type", "MEM|BUSY", "NONE"),
    # ... busy even when insert_resource() later put a device's resource inside (as with dump 02's Local APIC)
    (12, "7f000000-7f0fffff : Unusable memory\n  7f000000-7f000fff : PNP0C14:00\n",
     "7f000000-7f0fffff : Unusable memory", "MEM|BUSY", "NONE"),
    (12, "3ffb7000-3ffb8fff : Unknown E820 type\n  3ffb7000-3ffb7fff : MSFT0101:00\n",
     "3ffb7000-3ffb8fff : Unknown E820 type", "MEM|BUSY", "NONE"),
    # 13 e820__reserve_resources_late(): reserve_region_with_split(..., "RAM buffer")
    (13, "7ffe0000-7fffffff : RAM buffer\n", "7ffe0000-7fffffff : RAM buffer", "MEM|BUSY", "NONE"),
    (13, "7b800000-7bffffff : RAM buffer\n  7b800000-7b800fff : INT0800:00\n", "7b800000-7bffffff : RAM buffer",
     "MEM|BUSY", "NONE"),
    # 14 video_ram_resource: IORESOURCE_BUSY | IORESOURCE_MEM
    (14, "000a0000-000bffff : Video RAM area\n", "000a0000-000bffff : Video RAM area", "MEM|BUSY", "NONE"),
    (14, "000a0000-000bffff : Video RAM area\n  000a0000-000affff : PNP0900:00\n",
     "000a0000-000bffff : Video RAM area", "MEM|BUSY", "NONE"),
    # 15 probe_roms.c: IORESOURCE_BUSY | IORESOURCE_READONLY | IORESOURCE_MEM
    (15, "000c0000-000c9bff : Video ROM\n", "000c0000-000c9bff : Video ROM", "MEM|READONLY|BUSY", "NONE"),
    (15, "000ca000-000ca5ff : Adapter ROM\n", "000ca000-000ca5ff : Adapter ROM", "MEM|READONLY|BUSY", "NONE"),
    (15, "000f0000-000fffff : Reserved\n  000f0000-000fffff : System ROM\n", "000f0000-000fffff : System ROM",
     "MEM|READONLY|BUSY", "NONE"),
    # 16 root bus / bridge windows: not busy, with or without anything behind them
    (16, "000a0000-000bffff : PCI Bus 0000:00\n", "000a0000-000bffff : PCI Bus 0000:00", "MEM|WINDOW", "NONE"),
    (16, "c0000000-febfffff : PCI Bus 0000:00\n  fe000000-fe003fff : 0000:00:02.0\n",
     "c0000000-febfffff : PCI Bus 0000:00", "MEM|WINDOW", "NONE"),
    (16, "f0000000-f7ffffff : PCI Bus #0d\n", "f0000000-f7ffffff : PCI Bus #0d", "MEM|WINDOW", "NONE"),
    # 17 pci_mmconfig_alloc() / pci_ecam_create(): IORESOURCE_MEM | IORESOURCE_BUSY
    (17, "b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]\n  b0000000-bfffffff : Reserved\n",
     "b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]", "MEM|BUSY", "NONE"),
    (17, "c0000000-cfffffff : PCI ECAM 0000 [bus 00-ff]\n", "c0000000-cfffffff : PCI ECAM 0000 [bus 00-ff]",
     "MEM|BUSY", "NONE"),
    (17, "4010000000-401fffffff : PCI ECAM\n", "4010000000-401fffffff : PCI ECAM", "MEM|BUSY", "NONE"),
    # 18 ioapic_setup_resources(): IORESOURCE_MEM | IORESOURCE_BUSY, "IOAPIC %u"
    (18, "fec00000-fec003ff : IOAPIC 0\n", "fec00000-fec003ff : IOAPIC 0", "MEM|BUSY", "NONE"),
    (18, "fec40000-fec403ff : IOAPIC 12\n", "fec40000-fec403ff : IOAPIC 12", "MEM|BUSY", "NONE"),
    (18, "fec00000-fec00fff : Reserved\n  fec00000-fec003ff : IOAPIC 0\n", "fec00000-fec003ff : IOAPIC 0",
     "MEM|BUSY", "NONE"),  # inserted with its own desc, not the e820 range's
    # 19 lapic_resource: IORESOURCE_MEM | IORESOURCE_BUSY
    (19, "fee00000-fee00fff : Local APIC\n  fee00000-fee00fff : PNP0003:00\n", "fee00000-fee00fff : Local APIC",
     "MEM|BUSY", "NONE"),
    # 20 acpi_parse_hpet(): hpet_res->flags = IORESOURCE_MEM (issue 11 item 5)
    (20, "fed00000-fed003ff : HPET 0\n  fed00000-fed003ff : PNP0103:00\n", "fed00000-fed003ff : HPET 0", "MEM",
     "NONE"),
    (20, "fed00000-fed003ff : HPET 2\n", "fed00000-fed003ff : HPET 2", "MEM", "NONE"),
    # 21 pnp/system.c reserve_range(): request_mem_region(), then flags &= ~IORESOURCE_BUSY
    (21, "b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]\n  b0000000-bfffffff : Reserved\n"
         "    b0000000-bfffffff : pnp 00:05\n",
     "b0000000-bfffffff : pnp 00:05", "MEM", "RESERVED"),
    (21, "fed1c000-fed1ffff : pnp 00:07\n", "fed1c000-fed1ffff : pnp 00:07", "MEM", "NONE"),
    (21, "fee00000-feefffff : pnp 00:07\n  fee00000-fee00fff : Local APIC\n", "fee00000-feefffff : pnp 00:07",
     "MEM", "NONE"),
    # 22 platform_device_add(): insert_resource() with the ACPI resource's IORESOURCE_MEM
    (22, "fed00000-fed003ff : HPET 0\n  fed00000-fed003ff : PNP0103:00\n", "fed00000-fed003ff : PNP0103:00",
     "MEM", "NONE"),
    (22, "ff000000-ffffffff : INT0800:00\n", "ff000000-ffffffff : INT0800:00", "MEM", "NONE"),
    (22, "fe000000-fe00ffff : ACPI0007:00\n", "fe000000-fe00ffff : ACPI0007:00", "MEM", "NONE"),
    (22, "fee00000-fee00fff : Local APIC\n  fee00000-fee00fff : PNP0003:00\n", "fee00000-fee00fff : PNP0003:00",
     "MEM", "NONE"),
    (22, "fd690000-fd69ffff : INT34C5:00\n  fd690000-fd69ffff : INT34C5:00 INT34C5:00\n",
     "fd690000-fd69ffff : INT34C5:00", "MEM", "NONE"),
    (22, "fed1c000-fed1ffff : reserved\n  fed1f410-fed1f414 : iTCO_wdt.0.auto\n",
     "fed1f410-fed1f414 : iTCO_wdt.0.auto", "MEM", "NONE"),
    # ... the driver's claims below them: devm_ioremap_resource() / request_mem_region(dev_name): rule 25
    (25, "fd690000-fd69ffff : INT34C5:00\n  fd690000-fd69ffff : INT34C5:00 INT34C5:00\n",
     "fd690000-fd69ffff : INT34C5:00 INT34C5:00", "MEM|BUSY", "NONE"),
    (25, "fed1c000-fed1ffff : iTCO_wdt.1.auto\n  fed1f410-fed1f414 : iTCO_wdt.1.auto iTCO_wdt.1.auto\n",
     "fed1f410-fed1f414 : iTCO_wdt.1.auto iTCO_wdt.1.auto", "MEM|BUSY", "NONE"),
    # 23 pci_claim_resource(): request_resource() of the BAR, not busy
    (23, "c0000000-febfffff : PCI Bus 0000:00\n  fd000000-fdffffff : 0000:00:01.0\n",
     "fd000000-fdffffff : 0000:00:01.0", "MEM", "NONE"),
    (23, "c0000000-febfffff : PCI Bus 0000:00\n  fe000000-fe003fff : 0000:00:02.0\n"
         "    fe000000-fe003fff : virtio-pci-modern\n",
     "fe000000-fe003fff : 0000:00:02.0", "MEM", "NONE"),
    (23, "c0000000-febfffff : PCI Bus 10000:e0\n  c0000000-c0003fff : 10000:e0:06.0\n",
     "c0000000-c0003fff : 10000:e0:06.0", "MEM", "NONE"),
    (23, "b8c00000-b8c003ff : 0000:00:1f.2\n", "b8c00000-b8c003ff : 0000:00:1f.2", "MEM", "NONE"),
    # 24 other containers: a bus's or firmware's insert_resource(), not busy
    (24, "09000000-09000fff : pl011@9000000\n  09000000-09000fff : 9000000.pl011 pl011@9000000\n",
     "09000000-09000fff : pl011@9000000", "MEM", "NONE"),
    (24, "280000000-47fffffff : Soft Reserved\n  280000000-47fffffff : hmem.0\n"
         "    280000000-47fffffff : dax0.0\n      280000000-47fffffff : System RAM (kmem)\n",
     "280000000-47fffffff : hmem.0", "MEM", "NONE"),
    # 25 anything else without children: a driver's __request_region()
    (25, "c0000000-febfffff : PCI Bus 0000:00\n  fe000000-fe003fff : 0000:00:02.0\n"
         "    fe000000-fe003fff : virtio-pci-modern\n",
     "fe000000-fe003fff : virtio-pci-modern", "MEM|BUSY", "NONE"),
    (25, "fed90000-fed90fff : dmar0\n", "fed90000-fed90fff : dmar0", "MEM|BUSY", "NONE"),
    (25, "80000000-8fffffff : Reserved\n  80000000-87ffffff : Graphics Stolen Memory\n",
     "80000000-87ffffff : Graphics Stolen Memory", "MEM|BUSY", "RESERVED"),
    (25, "480000000-67fffffff : Persistent Memory\n  480000000-67fffffff : namespace0.0\n",
     "480000000-67fffffff : namespace0.0", "MEM|BUSY", "PERSISTENT_MEMORY"),
    (25, "40000000-7fffffff : System RAM\n  48000000-480fffff : ramoops\n", "48000000-480fffff : ramoops",
     "SYSTEM_RAM|BUSY", "NONE"),
    (25, "54d94000-54da2fff : ACPI Non-volatile Storage\n  54d98018-54d98067 : APEI ERST\n",
     "54d98018-54d98067 : APEI ERST", "MEM|BUSY", "ACPI_NV_STORAGE"),
    (25, "fe201000-fe2011ff : fe201000.serial serial@7e201000\n",
     "fe201000-fe2011ff : fe201000.serial serial@7e201000", "MEM|BUSY", "NONE"),
]


def _rule_ids(row):
    return f"{row[0]}:{row[2].partition(' : ')[2]}"


@pytest.mark.parametrize("rule,dump,line,flags,desc", RULES, ids=[_rule_ids(r) for r in RULES])
def test_rule(rule, dump, line, flags, desc):
    r = find(inferred(dump), line)
    assert shown(r.flags, r.desc) == (flag_names(parse_flags(flags)), parse_desc(desc)), f"rule {rule}"


def test_named_like_parent():
    """A device's own resource and the driver's claim of it print the same name; only the claim is busy."""
    tpm = inferred("fed20000-fed7ffff : Reserved\n  fed40000-fed44fff : MSFT0101:00\n"
                   "    fed40000-fed44fff : MSFT0101:00\n")
    outer, claim = [r for r, _ in tpm.walk() if r.name == "MSFT0101:00"]
    assert shown(outer.flags, outer.desc) == ("MEM", 0)  # rule 22: inserted with the device's own desc
    assert shown(claim.flags, claim.desc) == ("MEM|BUSY", 0)  # rule 25: requested below it
    amba = inferred("f8003000-f8003fff : /amba/dmac@f8003000\n  f8003000-f8003fff : /amba/dmac@f8003000\n")
    device, claim = [r for r, _ in amba.walk()]
    assert shown(device.flags, device.desc) == ("MEM", 0)  # rule 24
    assert shown(claim.flags, claim.desc) == ("MEM|BUSY", 0)  # rule 25
    pci = inferred("10000000-100fffff : 0000:00:00.0\n  10000000-100fffff : 0000:00:00.0\n")
    bar, claim = [r for r, _ in pci.walk()]
    assert (flag_names(bar.flags), flag_names(claim.flags)) == ("MEM", "MEM|BUSY")  # rules 23, 25


def test_every_rule_of_the_table_has_a_test():
    doc = infer_module.__doc__ or ""
    table = [int(m.group(1)) for m in re.finditer(r"^\| (\d+) +\|", doc, re.M)]
    assert table == list(range(1, len(table) + 1)), "rules are numbered 1, 2, ... in order"
    assert {row[0] for row in RULES} == set(table)


# ---------------------------------------------------------------------------------------
# What the rules are for: the two that show virtio-mem's 5.16 behaviour, and issue 11 item 5.

def test_virtio_container_is_exclusive_system_ram_and_not_busy():
    r = find(inferred("100000000-1ffffffff : virtio0\n  100000000-13fffffff : System RAM (virtio_mem)\n"),
             "100000000-1ffffffff : virtio0")
    assert r.flags & (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE) == IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE
    assert not r.flags & IORESOURCE_BUSY
    assert r.flags != IORESOURCE_MEM


def test_virtio_mem_blocks_are_mergeable_per_device():
    tree = inferred("100000000-13fffffff : virtio0\n  100000000-107ffffff : System RAM (virtio_mem)\n"
                    "  108000000-10fffffff : System RAM (virtio_mem)\n"
                    "140000000-17fffffff : virtio1\n  140000000-147ffffff : System RAM (virtio_mem)\n")
    blocks = [r for r, _ in tree.walk() if r.name == "System RAM (virtio_mem)"]
    assert all(b.flags & IORESOURCE_SYSRAM_MERGEABLE for b in blocks)
    assert blocks[0].name_id is blocks[1].name_id is blocks[0].parent
    assert blocks[2].name_id is blocks[2].parent is not blocks[0].parent


def _exclusive(tree: ResourceTree, addr: int, **config: bool):
    settings = {"strict": True, "io_strict": True, "exclusive_system_ram": True} | config
    return tree.iomem_is_exclusive(addr, **settings)


def test_default_machine_hpet_page_is_readable_under_io_strict_devmem():
    """Issue 11 item 5: HPET 0 and its PNP0103:00 are not busy, so /dev/mem may read the page."""
    tree = inferred(QEMU_Q35_2G.read_text())
    assert _exclusive(tree, 0xFED00000) is None
    assert _exclusive(tree, 0xFEC00000).name == "IOAPIC 0"
    assert _exclusive(tree, 0xFEE00000).name == "Local APIC"
    assert _exclusive(tree, 0xB0000000).name == "PCI MMCONFIG 0000 [bus 00-ff]"
    assert _exclusive(tree, 0xFE000000).name == "virtio-pci-modern"
    assert _exclusive(tree, 0xFD000000) is None  # a BAR nobody claimed
    assert _exclusive(tree, 0xFED1C000) is None  # e820 Reserved above 1 MiB
    assert _exclusive(tree, 0xF0000).name == "Reserved"  # ... and below it
    assert _exclusive(tree, 0xFED00000, io_strict=False) is None


# ---------------------------------------------------------------------------------------
# Whole dumps written from the spec and the kernel code: every line's flags and desc.

# Spec 3.3's worked example, flags as the spec gives them.
SPEC_3_3 = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-bfffffff : System RAM
  01000000-01e0ffff : Kernel code
100000000-13fffffff : System RAM
140000000-33fffffff : virtio0
  140000000-1bfffffff : System RAM (virtio_mem)
3280000000-32ffffffff : PCI Bus 0000:00
"""
SPEC_3_3_FLAGS = [
    ("MEM|BUSY", "RESERVED"),
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("MEM|BUSY", "RESERVED"),
    ("MEM|READONLY|BUSY", "NONE"),
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("SYSTEM_RAM|EXCLUSIVE", "NONE"),
    ("SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|SYSRAM_MERGEABLE|BUSY", "NONE"),
    ("MEM|WINDOW", "NONE"),
]

# The default machine once its driver has converged (README): the observed q35 dump plus
# the virtio-mem device, then a host with CXL, soft-reserved (HMAT) memory and PMEM.
DEFAULT_WITH_VIRTIO_MEM = QEMU_Q35_2G.read_text().replace(
    "fffc0000-ffffffff : Reserved\n",
    "fffc0000-ffffffff : Reserved\n100000000-1ffffffff : virtio0\n  100000000-13fffffff : System RAM (virtio_mem)\n")
DEFAULT_FLAGS = [
    ("MEM|BUSY", "RESERVED"),  # 00000000-00000fff : Reserved
    ("SYSTEM_RAM|BUSY", "NONE"),  # System RAM
    ("MEM|BUSY", "RESERVED"),  # 0009fc00 Reserved
    ("MEM|WINDOW", "NONE"),  # 000a0000 PCI Bus 0000:00
    ("MEM|READONLY|BUSY", "NONE"),  # Video ROM
    ("MEM|READONLY|BUSY", "NONE"),  # Adapter ROM
    ("MEM|BUSY", "RESERVED"),  # 000f0000 Reserved
    ("MEM|READONLY|BUSY", "NONE"),  # System ROM
    ("SYSTEM_RAM|BUSY", "NONE"),  # System RAM
    ("SYSTEM_RAM|BUSY", "NONE"),  # Kernel code
    ("SYSTEM_RAM|BUSY", "NONE"),  # Kernel rodata
    ("SYSTEM_RAM|BUSY", "NONE"),  # Kernel data
    ("SYSTEM_RAM|BUSY", "NONE"),  # Kernel bss
    ("MEM", "RESERVED"),  # 7ffe0000 Reserved
    ("MEM|WINDOW", "NONE"),  # 80000000 PCI Bus
    ("MEM|BUSY", "NONE"),  # PCI MMCONFIG
    ("MEM", "RESERVED"),  # b0000000 Reserved
    ("MEM", "RESERVED"),  # pnp 00:05
    ("MEM|WINDOW", "NONE"),  # c0000000 PCI Bus
    ("MEM", "NONE"),  # 0000:00:01.0
    ("MEM", "NONE"),  # 0000:00:02.0
    ("MEM|BUSY", "NONE"),  # virtio-pci-modern
    ("MEM", "NONE"),  # 0000:00:01.0
    ("MEM", "NONE"),  # 0000:00:1f.2
    ("MEM|BUSY", "NONE"),  # IOAPIC 0
    ("MEM", "NONE"),  # HPET 0
    ("MEM", "NONE"),  # PNP0103:00
    ("MEM", "RESERVED"),  # fed1c000 Reserved
    ("MEM|BUSY", "NONE"),  # Local APIC
    ("MEM", "RESERVED"),  # fffc0000 Reserved
    ("SYSTEM_RAM|EXCLUSIVE", "NONE"),  # virtio0
    ("SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|SYSRAM_MERGEABLE|BUSY", "NONE"),  # System RAM (virtio_mem)
    ("MEM|WINDOW", "NONE"),  # 340000000 PCI Bus
    ("MEM", "RESERVED"),  # fd00000000 Reserved
]

CXL_HOST = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-7fffffff : System RAM
  01000000-01e01d31 : Kernel code
  6f000000-7effffff : Crash kernel
80000000-afffffff : PCI Bus 0000:00
b0000000-bfffffff : PCI ECAM 0000 [bus 00-ff]
  b0000000-bfffffff : Reserved
    b0000000-bfffffff : pnp 00:04
c0000000-febfffff : PCI Bus 0000:00
  fe000000-fe003fff : 0000:00:02.0
    fe000000-fe003fff : virtio-pci-modern
fec00000-fec003ff : IOAPIC 0
fed00000-fed003ff : HPET 0
  fed00000-fed003ff : PNP0103:00
fed40000-fed44fff : MSFT0101:00
  fed40000-fed44fff : MSFT0101:00
fee00000-fee00fff : Local APIC
100000000-27fffffff : System RAM
280000000-47fffffff : Soft Reserved
  280000000-47fffffff : hmem.0
    280000000-47fffffff : dax0.0
      280000000-47fffffff : System RAM (kmem)
480000000-67fffffff : Persistent Memory
  480000000-67fffffff : namespace0.0
1050000000-304fffffff : CXL Window 0
  1050000000-304fffffff : region0
    1050000000-304fffffff : dax1.0
      1050000000-304fffffff : System RAM (kmem)
3050000000-404fffffff : CXL Window 1
"""
CXL_HOST_FLAGS = [
    ("MEM|BUSY", "RESERVED"),
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("MEM|BUSY", "RESERVED"),
    ("MEM|READONLY|BUSY", "NONE"),
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("SYSTEM_RAM|BUSY", "NONE"),  # Kernel code
    ("SYSTEM_RAM|BUSY", "CRASH_KERNEL"),
    ("MEM|WINDOW", "NONE"),
    ("MEM|BUSY", "NONE"),  # PCI ECAM
    ("MEM", "RESERVED"),
    ("MEM", "RESERVED"),  # pnp 00:04
    ("MEM|WINDOW", "NONE"),
    ("MEM", "NONE"),  # 0000:00:02.0
    ("MEM|BUSY", "NONE"),  # virtio-pci-modern
    ("MEM|BUSY", "NONE"),  # IOAPIC 0
    ("MEM", "NONE"),  # HPET 0
    ("MEM", "NONE"),  # PNP0103:00
    ("MEM", "NONE"),  # MSFT0101:00, the platform device's resource
    ("MEM|BUSY", "NONE"),  # MSFT0101:00, tpm_tis's claim
    ("MEM|BUSY", "NONE"),  # Local APIC
    ("SYSTEM_RAM|BUSY", "NONE"),
    ("MEM", "SOFT_RESERVED"),  # Soft Reserved
    ("MEM", "NONE"),  # hmem.0
    ("SYSTEM_RAM", "NONE"),  # dax0.0 (kmem)
    ("SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|BUSY", "NONE"),  # System RAM (kmem)
    ("MEM", "PERSISTENT_MEMORY"),
    ("MEM|BUSY", "PERSISTENT_MEMORY"),  # namespace0.0
    ("MEM", "CXL"),  # CXL Window 0
    ("MEM", "NONE"),  # region0
    ("SYSTEM_RAM", "NONE"),  # dax1.0 (kmem)
    ("SYSTEM_RAM|SYSRAM_DRIVER_MANAGED|BUSY", "NONE"),  # System RAM (kmem)
    ("MEM", "CXL"),  # CXL Window 1
]


@pytest.mark.parametrize("text,expected", [
    (SPEC_3_3, SPEC_3_3_FLAGS),
    (DEFAULT_WITH_VIRTIO_MEM, DEFAULT_FLAGS),
    (CXL_HOST, CXL_HOST_FLAGS),
], ids=["spec-3.3", "default-machine-with-virtio-mem", "cxl-hmem-pmem-host"])
def test_whole_dump(text, expected):
    tree = inferred(text)
    got = [(r.name, *shown(r.flags, r.desc)) for r, _ in tree.walk()]
    want = [(r.name, flag_names(parse_flags(f)), parse_desc(d)) for (r, _), (f, d) in zip(tree.walk(), expected)]
    assert len(got) == len(expected)
    assert got == want


# ---------------------------------------------------------------------------------------
# Real dumps: what their lines say about the rules.

def test_real_dumps_platform_devices_and_their_claims():
    by_name = {p.name[:2]: p for p in DUMPS}
    laptop = inferred(by_name["18"].read_text())
    device, claim = [r for r, _ in laptop.walk() if r.start == 0xFD690000]
    assert (device.name, flag_names(device.flags)) == ("INT34C5:00", "MEM")
    assert (claim.name, flag_names(claim.flags)) == ("INT34C5:00 INT34C5:00", "MEM|BUSY")
    hyperv = inferred(by_name["02"].read_text())
    lapic, pnp = [r for r, _ in hyperv.walk() if r.start == 0xFEE00000]
    assert (flag_names(lapic.flags), flag_names(pnp.flags)) == ("MEM|BUSY", "MEM")
    server = inferred(by_name["04"].read_text())
    assert [flag_names(r.flags) for r, _ in server.walk() if r.name == "HPET 0"] == ["MEM"]
    assert {flag_names(r.flags) for r, _ in server.walk() if r.name == "pnp 00:07"} == {"MEM"}


@pytest.mark.parametrize("path", DUMPS + [QEMU_Q35_2G], ids=lambda p: p.name)
def test_real_dump_every_resource_is_memory(path):
    """Whatever the rule, every resource of /proc/iomem comes out IORESOURCE_MEM typed."""
    tree = inferred(path.read_text())
    for r, _ in tree.walk():
        assert r.flags & IORESOURCE_TYPE_BITS == IORESOURCE_MEM, r.label()
