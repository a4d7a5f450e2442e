"""`include/linux/ioport.h`: IORESOURCE_* / IORES_DESC_* values and `struct resource`.

Values are those of every kernel since ~4.6 (spec section 1.1/1.2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

IORESOURCE_BITS = 0x000000FF
IORESOURCE_TYPE_BITS = 0x00001F00
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_REG = 0x00000300
IORESOURCE_IRQ = 0x00000400
IORESOURCE_DMA = 0x00000800
IORESOURCE_BUS = 0x00001000
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_READONLY = 0x00004000
IORESOURCE_CACHEABLE = 0x00008000
IORESOURCE_RANGELENGTH = 0x00010000
IORESOURCE_SHADOWABLE = 0x00020000
IORESOURCE_SIZEALIGN = 0x00040000
IORESOURCE_STARTALIGN = 0x00080000
IORESOURCE_MEM_64 = 0x00100000
IORESOURCE_WINDOW = 0x00200000
IORESOURCE_MUXED = 0x00400000
IORESOURCE_EXT_TYPE_BITS = 0x01000000
IORESOURCE_SYSRAM = 0x01000000
IORESOURCE_SYSRAM_DRIVER_MANAGED = 0x02000000
IORESOURCE_SYSRAM_MERGEABLE = 0x04000000
IORESOURCE_EXCLUSIVE = 0x08000000
IORESOURCE_DISABLED = 0x10000000
IORESOURCE_UNSET = 0x20000000
IORESOURCE_AUTO = 0x40000000
IORESOURCE_BUSY = 0x80000000
IORESOURCE_SYSTEM_RAM = IORESOURCE_MEM | IORESOURCE_SYSRAM

IORES_DESC_NONE = 0
IORES_DESC_CRASH_KERNEL = 1
IORES_DESC_ACPI_TABLES = 2
IORES_DESC_ACPI_NV_STORAGE = 3
IORES_DESC_PERSISTENT_MEMORY = 4
IORES_DESC_PERSISTENT_MEMORY_LEGACY = 5
IORES_DESC_DEVICE_PRIVATE_MEMORY = 6
IORES_DESC_RESERVED = 7
IORES_DESC_SOFT_RESERVED = 8
IORES_DESC_CXL = 9

# Names accepted in TOML machine files and printed in audit records. Composite
# names come first so that flag_names() prefers SYSTEM_RAM over MEM|SYSRAM.
FLAG_BITS: dict[str, int] = {
    "SYSTEM_RAM": IORESOURCE_SYSTEM_RAM,
    "IO": IORESOURCE_IO,
    "MEM": IORESOURCE_MEM,
    "REG": IORESOURCE_REG,
    "IRQ": IORESOURCE_IRQ,
    "DMA": IORESOURCE_DMA,
    "BUS": IORESOURCE_BUS,
    "PREFETCH": IORESOURCE_PREFETCH,
    "READONLY": IORESOURCE_READONLY,
    "CACHEABLE": IORESOURCE_CACHEABLE,
    "RANGELENGTH": IORESOURCE_RANGELENGTH,
    "SHADOWABLE": IORESOURCE_SHADOWABLE,
    "SIZEALIGN": IORESOURCE_SIZEALIGN,
    "STARTALIGN": IORESOURCE_STARTALIGN,
    "MEM_64": IORESOURCE_MEM_64,
    "WINDOW": IORESOURCE_WINDOW,
    "MUXED": IORESOURCE_MUXED,
    "SYSRAM": IORESOURCE_SYSRAM,
    "SYSRAM_DRIVER_MANAGED": IORESOURCE_SYSRAM_DRIVER_MANAGED,
    "SYSRAM_MERGEABLE": IORESOURCE_SYSRAM_MERGEABLE,
    "EXCLUSIVE": IORESOURCE_EXCLUSIVE,
    "DISABLED": IORESOURCE_DISABLED,
    "UNSET": IORESOURCE_UNSET,
    "AUTO": IORESOURCE_AUTO,
    "BUSY": IORESOURCE_BUSY,
}

DESC_VALUES: dict[str, int] = {
    "NONE": IORES_DESC_NONE,
    "CRASH_KERNEL": IORES_DESC_CRASH_KERNEL,
    "ACPI_TABLES": IORES_DESC_ACPI_TABLES,
    "ACPI_NV_STORAGE": IORES_DESC_ACPI_NV_STORAGE,
    "PERSISTENT_MEMORY": IORES_DESC_PERSISTENT_MEMORY,
    "PERSISTENT_MEMORY_LEGACY": IORES_DESC_PERSISTENT_MEMORY_LEGACY,
    "DEVICE_PRIVATE_MEMORY": IORES_DESC_DEVICE_PRIVATE_MEMORY,
    "RESERVED": IORES_DESC_RESERVED,
    "SOFT_RESERVED": IORES_DESC_SOFT_RESERVED,
    "CXL": IORES_DESC_CXL,
}


_TYPES = {IORESOURCE_IO: "IO", IORESOURCE_MEM: "MEM", IORESOURCE_REG: "REG",
          IORESOURCE_IRQ: "IRQ", IORESOURCE_DMA: "DMA", IORESOURCE_BUS: "BUS"}


def flag_names(flags: int) -> str:
    """Render flags as `SYSTEM_RAM|EXCLUSIVE`, the form audit records use."""
    names = []
    rest = flags
    if rest & IORESOURCE_SYSTEM_RAM == IORESOURCE_SYSTEM_RAM:
        names.append("SYSTEM_RAM")
        rest &= ~IORESOURCE_SYSTEM_RAM
    elif rest & IORESOURCE_TYPE_BITS in _TYPES:
        names.append(_TYPES[rest & IORESOURCE_TYPE_BITS])
        rest &= ~IORESOURCE_TYPE_BITS
    for name, bit in FLAG_BITS.items():
        if bit & (bit - 1) == 0 and bit > IORESOURCE_TYPE_BITS and rest & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def parse_flags(text: str | int) -> int:
    """Parse `MEM|BUSY` (names of FLAG_BITS, or numbers) into a flags word."""
    if isinstance(text, int):
        return text
    flags = 0
    for word in text.replace(" ", "").split("|"):
        if not word:
            continue
        if word.upper() in FLAG_BITS:
            flags |= FLAG_BITS[word.upper()]
        else:
            try:
                flags |= int(word, 0)
            except ValueError:
                raise ValueError(f"unknown resource flag {word!r} (known: {', '.join(FLAG_BITS)})") from None
    return flags


def parse_desc(text: str | int) -> int:
    if isinstance(text, int):
        return text
    key = text.upper().removeprefix("IORES_DESC_")
    if key not in DESC_VALUES:
        raise ValueError(f"unknown resource desc {text!r} (known: {', '.join(DESC_VALUES)})")
    return DESC_VALUES[key]


@dataclass(eq=False)
class Resource:
    """`struct resource`: an inclusive range [start, end] in a tree.

    `children` is the kernel's sibling list (sorted by start for every tree the
    kernel builds; a parsed dump keeps its file order). `name_id` stands for the
    kernel's name *pointer*: merge_system_ram_resource compares pointers, so two
    resources with equal text but different owners never merge.
    """

    start: int
    end: int
    name: str | None
    flags: int = IORESOURCE_MEM
    desc: int = IORES_DESC_NONE
    parent: Resource | None = field(default=None, repr=False)
    children: list[Resource] = field(default_factory=list, repr=False)
    name_id: object = None
    # Lookup index over `children`, rebuilt lazily after the list changes.
    _ix: object = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """resource_size()"""
        return self.end - self.start + 1

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and self.end >= start

    def label(self) -> str:
        """How audit records and error messages name a resource."""
        return f"[{self.start:#x}-{self.end:#x}] {self.name!r} ({flag_names(self.flags)})"
