"""`/dev/mem` access policy: devmem_is_allowed() and its Kconfig / boot-parameter knobs (spec 2.12, 4, 5).

`PolicyMap` evaluates the kernel's per-page function once per stretch of
pages that no resource boundary cuts (every page of such a stretch overlaps
the same resources, so the kernel answers the same for each) and serves
per-access questions by bisection.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from .ioport import (IORES_DESC_NONE, IORESOURCE_BUSY, IORESOURCE_EXCLUSIVE, IORESOURCE_SYSTEM_RAM, Resource,
                     flag_names)
from .resource import PAGE_SIZE, REGION_DISJOINT, ResourceTree

PAGE_SHIFT = 12
FIRST_MIB_PFN = 256
ARCHES = ("x86_64", "arm64")


class ConfigError(ValueError):
    """A bad --set key, value or Kconfig combination."""


@dataclass(frozen=True)
class DevmemConfig:
    """The kernel configuration that decides /dev/mem access.

    Defaults are Debian 12's kernel (6.1): x86_64, STRICT_DEVMEM=y,
    IO_STRICT_DEVMEM=y, EXCLUSIVE_SYSTEM_RAM=y, iomem=strict, and the
    descending region_intersects() of 6.1.115+.
    """

    arch: str = "x86_64"
    strict_devmem: bool = True
    io_strict_devmem: bool = True
    exclusive_system_ram: bool = True
    strict_iomem_checks: bool = True
    region_intersects_descend: bool = True

    KEYS = ("arch", "STRICT_DEVMEM", "IO_STRICT_DEVMEM", "EXCLUSIVE_SYSTEM_RAM", "iomem", "region_intersects")

    @classmethod
    def from_settings(cls, settings: dict[str, str]) -> DevmemConfig:
        """Apply `--set KEY=VALUE` words with Kconfig dependencies (spec 2.12).

        IO_STRICT_DEVMEM and EXCLUSIVE_SYSTEM_RAM depend on STRICT_DEVMEM and
        follow it unless set; strict_iomem_checks starts as STRICT_DEVMEM and
        iomem= overrides it. Keys other than KEYS are ignored here.
        """
        arch = settings.get("arch", "x86_64")
        if arch not in ARCHES:
            raise ConfigError(f"arch={arch!r}: expected one of {', '.join(ARCHES)}")
        strict = _yes_no(settings, "STRICT_DEVMEM", True)
        io_strict = _yes_no(settings, "IO_STRICT_DEVMEM", strict)
        exclusive = _yes_no(settings, "EXCLUSIVE_SYSTEM_RAM", strict)
        if io_strict and not strict:
            raise ConfigError("IO_STRICT_DEVMEM=y needs STRICT_DEVMEM=y "
                              "(lib/Kconfig.debug: 'config IO_STRICT_DEVMEM ... depends on STRICT_DEVMEM')")
        if exclusive and not strict:
            raise ConfigError("EXCLUSIVE_SYSTEM_RAM=y needs STRICT_DEVMEM=y "
                              "(mm/Kconfig: 'config EXCLUSIVE_SYSTEM_RAM def_bool y "
                              "depends on !DEVMEM || STRICT_DEVMEM')")
        iomem = settings.get("iomem", "strict" if strict else "relaxed")
        if iomem not in ("strict", "relaxed"):
            raise ConfigError(f"iomem={iomem!r}: expected strict or relaxed")
        walk = settings.get("region_intersects", "descend")
        if walk not in ("descend", "toplevel"):
            raise ConfigError(f"region_intersects={walk!r}: expected descend (6.1.115+) or toplevel (older)")
        return cls(arch, strict, io_strict, exclusive, iomem == "strict", walk == "descend")

    def describe(self) -> dict[str, str]:
        yn = {True: "y", False: "n"}
        return {
            "arch": self.arch,
            "STRICT_DEVMEM": yn[self.strict_devmem],
            "IO_STRICT_DEVMEM": yn[self.io_strict_devmem],
            "EXCLUSIVE_SYSTEM_RAM": yn[self.exclusive_system_ram],
            "iomem": "strict" if self.strict_iomem_checks else "relaxed",
            "region_intersects": "descend" if self.region_intersects_descend else "toplevel",
        }


def _yes_no(settings: dict[str, str], key: str, default: bool) -> bool:
    value = settings.get(key)
    if value is None:
        return default
    if value not in ("y", "n"):
        raise ConfigError(f"{key}={value!r}: expected y or n")
    return value == "y"


@dataclass(frozen=True)
class Verdict:
    """devmem_is_allowed() for a page: 0 refused, 1 allowed, 2 zero-filled (x86 low MiB RAM)."""

    allowed: int
    rule: str = ""


ALLOWED = Verdict(1)


def devmem_is_allowed(tree: ResourceTree, config: DevmemConfig, pfn: int) -> Verdict:
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
            ram = next((r for r in tree.overlapping(addr, addr + PAGE_SIZE - 1)
                        if r.flags & IORESOURCE_SYSTEM_RAM == IORESOURCE_SYSTEM_RAM), None)
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
        ram = next(r for r in tree.overlapping(addr, addr + PAGE_SIZE - 1)
                   if r.flags & (IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY) == IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY)
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

    def __init__(self, tree: ResourceTree, config: DevmemConfig) -> None:
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
