"""/proc/meminfo of the simulated machine (fs/proc/meminfo.c's format), as LXCFS serves a container's.

MemTotal is the RAM the kernel manages: boot RAM, plus hot-added memory that
is plugged and in an online memory block (offline blocks and unplugged
subblocks are not managed). What the kernel image and unmovable allocations
hold is in use; the rest is free. The other fields are the ones `free`,
`top` and `vmstat` read, at values a quiet guest shows.
"""
from __future__ import annotations

from .kernel.ioport import IORESOURCE_SYSTEM_RAM
from .kernel.memory_hotplug import boot_ram
from .machine import Machine

KIB = 1024


def managed_bytes(machine: Machine) -> int:
    """totalram_pages() in bytes: boot RAM plus plugged memory of online hot-added blocks."""
    total = sum(r.size for r in boot_ram(machine.tree))
    for v in machine.virtio.values():
        for start, end in v.driver.plugged_ranges():
            total += sum(min(end, b.start + b.size) - max(start, b.start)
                         for b in machine.hotplug.blocks_in(start, end - start) if b.online)
    return total


def used_bytes(machine: Machine) -> int:
    """What the kernel itself holds: its image (RAM resources nested in boot RAM) and unmovable pages."""
    image = sum(c.size for r in boot_ram(machine.tree) for c in r.children
                if c.flags & IORESOURCE_SYSTEM_RAM == IORESOURCE_SYSTEM_RAM)
    unmovable = sum(b.unmovable_size for v in machine.virtio.values()
                    for b in machine.hotplug.blocks_in(v.device.addr, v.device.region_size))
    return image + unmovable


def meminfo(machine: Machine) -> str:
    """The text of /proc/meminfo: `Key:  value kB` lines, values right-aligned as the kernel prints them."""
    total = managed_bytes(machine) // KIB
    free = max(total - used_bytes(machine) // KIB, 0)
    fields = [("MemTotal", total), ("MemFree", free), ("MemAvailable", free), ("Buffers", 0), ("Cached", 0),
              ("SwapCached", 0), ("Active", 0), ("Inactive", 0), ("SwapTotal", 0), ("SwapFree", 0),
              ("Dirty", 0), ("Writeback", 0), ("AnonPages", 0), ("Mapped", 0), ("Shmem", 0),
              ("KReclaimable", 0), ("Slab", 0), ("SReclaimable", 0), ("SUnreclaim", 0),
              ("CommitLimit", total // 2), ("Committed_AS", 0)]
    return "".join(f"{key + ':':<16}{value:>8} kB\n" for key, value in fields)
