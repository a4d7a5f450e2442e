"""devmem_is_allowed() per architecture (spec 2.12, 5), and a map of it over the address space.

`PolicyMap` evaluates the kernel's per-page function once per stretch of
pages that no resource boundary cuts (every page of such a stretch overlaps
the same resources, so the kernel answers the same for each) and serves
per-access questions by bisection.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from ..settings import Config
from .ioport import IORES_DESC_NONE, IORESOURCE_EXCLUSIVE, IORESOURCE_SYSTEM_RAM, Resource, flag_names
from .resource import REGION_DISJOINT, ResourceTree
from .sizes import FIRST_MIB_PFN, PAGE_SHIFT, PAGE_SIZE


@dataclass(frozen=True)
class Verdict:
    """devmem_is_allowed() for a page: 0 refused, 1 allowed, 2 zero-filled (x86 low MiB RAM)."""

    allowed: int
    rule: str = ""


ALLOWED = Verdict(1)


def devmem_is_allowed(tree: ResourceTree, config: Config, pfn: int) -> Verdict:
    """arch/x86/mm/init.c or lib/devmem_is_allowed.c, with the rule that fired."""
    addr = pfn << PAGE_SHIFT
    exclusive = tree.iomem_is_exclusive(addr, strict=config.strict_iomem_checks,
                                        io_strict=config.io_strict_devmem,
                                        exclusive_system_ram=config.exclusive_system_ram)
    because = f"iomem_is_exclusive: {_named(exclusive)}" if exclusive else ""
    if config.arch == "x86_64":
        kind = tree.region_intersects(addr, PAGE_SIZE, IORESOURCE_SYSTEM_RAM, IORES_DESC_NONE,
                                      descend=config.region_intersects_descend)
        if kind != REGION_DISJOINT:
            ram = next(tree.walk_iomem_res_desc(IORES_DESC_NONE, IORESOURCE_SYSTEM_RAM, addr, addr + PAGE_SIZE - 1))
            rule = f"devmem_is_allowed: System RAM page: {_named(ram)}"
            if pfn < FIRST_MIB_PFN:
                return Verdict(2, rule + " below 1 MiB reads as zeros")
            if exclusive is not None and exclusive.flags & IORESOURCE_EXCLUSIVE:
                # Both rules refuse; name the 5.16 one, which is what this page is about.
                rule = f"{because}; {rule}"
            return Verdict(0, rule)
        if exclusive:
            return ALLOWED if pfn < FIRST_MIB_PFN else Verdict(0, because)
        return ALLOWED
    if exclusive:
        return Verdict(0, because)
    if tree.page_is_ram(pfn):
        ram = next(tree.walk_system_ram_res(addr, addr + PAGE_SIZE - 1))
        return Verdict(0, f"devmem_is_allowed: page_is_ram {_named(ram)}")
    return ALLOWED


def _named(r: Resource | None) -> str:
    return "" if r is None else f"{r.name} ({flag_names(r.flags)})"


class PolicyMap:
    """devmem_is_allowed() over the whole address space, as runs of pages.

    Pages are grouped at every resource's first page, last page and the page
    after it (and at 1 MiB): inside such a group every page overlaps exactly
    the same resources, whole or partly in the same way, so one evaluation
    stands for all of them.
    """

    def __init__(self, tree: ResourceTree, config: Config) -> None:
        cuts = {0, FIRST_MIB_PFN}
        for start, end in tree.boundaries():
            cuts.update((start >> PAGE_SHIFT, end >> PAGE_SHIFT, (end >> PAGE_SHIFT) + 1))
        self.starts: list[int] = []
        self.verdicts: list[Verdict] = []
        for pfn in sorted(c for c in cuts if c < 1 << (64 - PAGE_SHIFT)):
            verdict = devmem_is_allowed(tree, config, pfn)
            if not self.verdicts or verdict != self.verdicts[-1]:
                self.starts.append(pfn)
                self.verdicts.append(verdict)

    def runs(self, first_pfn: int, last_pfn: int) -> Iterator[tuple[int, int, Verdict]]:
        """(first pfn, last pfn, verdict) covering [first_pfn, last_pfn] in order."""
        i = bisect.bisect_right(self.starts, first_pfn) - 1
        pfn = first_pfn
        while pfn <= last_pfn:
            end = self.starts[i + 1] - 1 if i + 1 < len(self.starts) else (1 << 52) - 1
            stop = min(end, last_pfn)
            yield pfn, stop, self.verdicts[i]
            pfn = stop + 1
            i += 1

    def verdict(self, pfn: int) -> Verdict:
        return self.verdicts[bisect.bisect_right(self.starts, pfn) - 1]
