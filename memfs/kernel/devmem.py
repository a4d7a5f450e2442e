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
from .resindex import splice_runs, union
from .resource import REGION_DISJOINT, ResourceTree
from .sizes import FIRST_MIB_PFN, PAGE_SHIFT, PAGE_SIZE

MAX_PFN = (1 << (64 - PAGE_SHIFT)) - 1


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


def _cuts(start: int, end: int) -> tuple[int, ...]:
    """The pages where a resource [start, end] may change what the kernel answers: its first
    page and, when it starts inside a page, the first page it covers whole (page_is_ram() asks
    for whole pages); its last page when that is covered in part, and the page after it (a
    wholly covered last page answers as the pages before it)."""
    first, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    cuts = (first, first + 1) if start & (PAGE_SIZE - 1) else (first,)
    if end & (PAGE_SIZE - 1) != PAGE_SIZE - 1:
        return cuts + (last, last + 1)
    return cuts + (last + 1,)


class PolicyMap:
    """devmem_is_allowed() over the whole address space, as runs of pages.

    Pages are grouped at every resource's first page, first whole page, partly
    covered last page and the page after it (and at 1 MiB): inside such a
    group every page overlaps exactly the same resources, whole or partly in
    the same way, so one evaluation stands for all of them. Runs are maximal
    (neighbours differ), so the map is a function of the per-page answers alone.

    `invalidate(start, end)` marks an address range the tree changed;
    `update()` redoes only the marked ranges, from the resources overlapping
    them (ResourceTree.on_change says which): the result is the map a full
    build would give, at a cost that grows with what changed.
    """

    def __init__(self, tree: ResourceTree, config: Config) -> None:
        self.tree = tree
        self.config = config
        cuts = {0, FIRST_MIB_PFN}
        for start, end in tree.boundaries():
            cuts.update(_cuts(start, end))
        self.starts: list[int] = []
        self.verdicts: list[Verdict] = []
        for pfn in sorted(c for c in cuts if c < MAX_PFN + 1):
            verdict = devmem_is_allowed(tree, config, pfn)
            if not self.verdicts or verdict != self.verdicts[-1]:
                self.starts.append(pfn)
                self.verdicts.append(verdict)
        self.pending: list[tuple[int, int]] = []  # page ranges to redo
        # The run of the last lookup: (first pfn, last pfn, verdict); most accesses land in it again.
        self.hit: tuple[int, int, Verdict] = (0, -1, ALLOWED)

    # -- incremental rebuild ----------------------------------------------------

    def invalidate(self, start: int, end: int) -> None:
        """The tree changed what overlaps [start, end] (bytes): redo its pages at the next update()."""
        self.pending.append((start >> PAGE_SHIFT, min(end >> PAGE_SHIFT, MAX_PFN)))
        self.hit = (0, -1, ALLOWED)
        if len(self.pending) > 4096:  # many small changes between two reads: keep the list short
            self.pending = union(self.pending)

    def update(self) -> None:
        """Redo the pending ranges (no-op without any)."""
        if self.pending:
            dirty, self.pending = union(self.pending), []
            self.starts, self.verdicts = splice_runs(self.starts, self.verdicts, dirty, self._evaluate,
                                                     MAX_PFN + 1)
            self.hit = (0, -1, ALLOWED)

    def _evaluate(self, lo: int, hi: int) -> Iterator[tuple[int, Verdict]]:
        """(pfn, verdict) at the group starts of [lo, hi], from the resources overlapping it."""
        cuts = {lo}
        if lo < FIRST_MIB_PFN <= hi:
            cuts.add(FIRST_MIB_PFN)
        for r in self.tree.overlapping(lo << PAGE_SHIFT, (hi << PAGE_SHIFT) | (PAGE_SIZE - 1)):
            for c in _cuts(r.start, r.end):
                if lo < c <= hi:
                    cuts.add(c)
        tree, config = self.tree, self.config
        return ((pfn, devmem_is_allowed(tree, config, pfn)) for pfn in sorted(cuts))

    # -- lookups ------------------------------------------------------------------

    def run(self, pfn: int) -> tuple[int, int, Verdict]:
        """(first pfn, last pfn, verdict) of the run holding pfn."""
        hit = self.hit
        if hit[0] <= pfn <= hit[1]:
            return hit
        starts = self.starts
        i = bisect.bisect_right(starts, pfn) - 1
        hit = self.hit = (starts[i], starts[i + 1] - 1 if i + 1 < len(starts) else MAX_PFN, self.verdicts[i])
        return hit

    def runs(self, first_pfn: int, last_pfn: int) -> Iterator[tuple[int, int, Verdict]]:
        """(first pfn, last pfn, verdict) covering [first_pfn, last_pfn] in order."""
        i = bisect.bisect_right(self.starts, first_pfn) - 1
        pfn = first_pfn
        while pfn <= last_pfn:
            end = self.starts[i + 1] - 1 if i + 1 < len(self.starts) else MAX_PFN
            stop = min(end, last_pfn)
            yield pfn, stop, self.verdicts[i]
            pfn = stop + 1
            i += 1

    def verdict(self, pfn: int) -> Verdict:
        return self.verdicts[bisect.bisect_right(self.starts, pfn) - 1]
