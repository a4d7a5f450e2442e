"""Sizes the kernel spells as constants (include/linux/sizes.h, asm/page.h): one home for each."""
from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

SZ_1K = 1 << 10
SZ_1M = 1 << 20
SZ_1G = 1 << 30
SZ_1T = 1 << 40

# The first MiB: x86's devmem_is_allowed() and BIOS-era layout both key off it.
FIRST_MIB_PFN = SZ_1M >> PAGE_SHIFT
