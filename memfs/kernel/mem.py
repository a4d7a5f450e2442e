"""drivers/char/mem.c for /dev/mem (spec 4): the checks, read_mem(), write_mem() and mmap_mem().

Works against a small physical-memory interface (`PhysBus`: load and store
by physical address, faulting where the hardware would), so it knows nothing
of what backs an address. Every check is a function of the kernel's name;
every config switch is decided once, inside the function the kernel decides
it in. read_mem()/write_mem() are the kernel's per-page loops, taken a run
of pages at a time: `PolicyMap` groups pages that devmem_is_allowed()
answers alike, so one step of the loop stands for each page of its run.
"""
from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from ..settings import Config
from .devmem import ALLOWED, PolicyMap, Verdict
from .resindex import union
from .resource import ResourceTree
from .sizes import PAGE_SHIFT

ARM64_PHYS_MASK_SHIFT = 48
_U64 = 1 << 64
Buffer = bytes | memoryview  # what a read answers: a view of memory is sent at once, never kept
_ZERO_PAGE = bytes(1 << PAGE_SHIFT)  # immutable: shared by every page-sized zero-filled read


class AccessError(OSError):
    """A /dev/mem access the kernel fails: errno, the rule that refused it, the bytes it concerns."""

    def __init__(self, err: int, rule: str, start: int, end: int) -> None:
        super().__init__(err, rule)
        self.rule = rule
        self.start = start
        self.end = end


class Refusal(NamedTuple):
    """An AccessError not raised (yet): what try_read_mem() answers, cheap to make."""

    errno: int
    rule: str
    start: int
    end: int

    def error(self) -> AccessError:
        return AccessError(self.errno, self.rule, self.start, self.end)


def _refusal(err: int, rule: str, start: int, end: int) -> Refusal:
    """Refusal(...) without the generated __new__ (a refused read's cost is mostly such calls)."""
    return _new_tuple(Refusal, (err, rule, start, end))


_new_tuple = tuple.__new__


class BusFault(Exception):
    """copy_from_kernel_nofault()/copy_from_user() fault: nothing answers at `addr`."""

    def __init__(self, addr: int, reason: str) -> None:
        super().__init__(reason)
        self.addr = addr
        self.reason = reason


class PhysBus(Protocol):
    """Physical memory as the CPU reaches it (xlate_dev_mem_ptr())."""

    def load(self, addr: int, size: int) -> Buffer:
        """The bytes at [addr, addr+size) (a view valid until the next store, or a copy); raises
        BusFault where nothing answers."""

    def store(self, addr: int, data: bytes | memoryview) -> None:
        """Store data at addr; raises BusFault (having stored nothing) where nothing answers."""


class DevMem:
    """/dev/mem of one machine: mem.c's functions over its tree, settings and bus.

    `high_memory_end` gives the last byte below x86 high_memory (it moves
    with memory hotplug). The policy map follows the tree's changes: each
    change marks its address range (ResourceTree.on_change) and the next
    access redoes that range only.
    """

    def __init__(self, tree: ResourceTree, config: Config, bus: PhysBus, phys_bits: int,
                 high_memory_end: Callable[[], int]) -> None:
        self.tree = tree
        self.config = config
        self.bus = bus
        self.phys_bits = phys_bits
        self.high_memory_end = high_memory_end
        self._generation = -1  # of _memblock
        self._policy: PolicyMap | None = None
        self._memblock: list[tuple[int, int]] = []
        tree.on_change(self._tree_changed)

    def _tree_changed(self, start: int, end: int) -> None:
        if self._policy is not None:
            self._policy.invalidate(start, end)

    def _fresh(self) -> PolicyMap:
        policy = self._policy
        if policy is None:
            policy = self._policy = PolicyMap(self.tree, self.config)
        elif policy.pending:
            policy.update()
        return policy

    def prepare(self) -> None:
        """Build what the first access would otherwise build (a mount does this before serving)."""
        if self.config.strict_devmem or self.config.arch != "x86_64":
            self._fresh()

    # -- validity helpers (spec 4.3) -----------------------------------------

    def valid_phys_addr_range(self, addr: int, count: int) -> bool:
        """x86: addr + count - 1 <= __pa(high_memory - 1) in u64; arm64: inside one memblock region."""
        if self.config.arch == "x86_64":
            return (addr + count - 1) % _U64 <= self.high_memory_end()
        if self._generation != self.tree.generation:
            self._memblock = union((r.start, r.end) for r in self.tree.walk_system_ram_res())
            self._generation = self.tree.generation
        return any(start <= addr and addr + count - 1 <= end for start, end in self._memblock)

    def valid_mmap_phys_addr_range(self, pfn: int, size: int) -> bool:
        """x86: the last byte below 2^x86_phys_bits; arm64: below PHYS_MASK."""
        bits = self.phys_bits if self.config.arch == "x86_64" else ARM64_PHYS_MASK_SHIFT
        return ((pfn << PAGE_SHIFT) + size - 1) >> bits == 0

    # -- page_is_allowed / range_is_allowed (spec 4.4) ----------------------

    def page_is_allowed_runs(self, first_pfn: int, last_pfn: int) -> Iterator[tuple[int, int, Verdict]]:
        """page_is_allowed() for every page of [first_pfn, last_pfn], as (first, last, verdict) runs.

        STRICT_DEVMEM=y: devmem_is_allowed(); =n: every page is allowed (1).
        """
        policy = self._page_policy()
        if policy is None:
            return iter(((first_pfn, last_pfn, ALLOWED),))
        return policy.runs(first_pfn, last_pfn)

    def page_is_allowed(self, pfn: int) -> Verdict:
        """page_is_allowed(): 0 refused, 1 allowed, 2 zero-filled, with the rule."""
        policy = self._page_policy()
        return ALLOWED if policy is None else policy.run(pfn)[2]

    def _page_policy(self) -> PolicyMap | None:
        """The one place STRICT_DEVMEM is decided: devmem_is_allowed()'s map when it is y,
        None when it is n (page_is_allowed() then allows every page)."""
        return self._fresh() if self.config.strict_devmem else None

    def range_is_allowed(self, pfn: int, size: int) -> Verdict:
        """range_is_allowed(): the first refusing page's verdict, else ALLOWED (2 counts as allowed)."""
        last = ((pfn << PAGE_SHIFT) + size - 1) >> PAGE_SHIFT
        policy = self._page_policy()
        if policy is None:
            return ALLOWED
        first, end, verdict = policy.run(pfn)
        if last <= end:  # one run: the common case
            return verdict if verdict.allowed == 0 else ALLOWED
        return next((v for _, _, v in self.page_is_allowed_runs(pfn, last) if v.allowed == 0), ALLOWED)

    def phys_mem_access_prot_allowed(self, pfn: int, size: int) -> Verdict:
        """x86 (pat/memtype.c): without STRICT_DEVMEM, PAT refuses any page devmem_is_allowed()
        refuses (cache aliasing of RAM); with it, and on arm64 (the __weak default), always 1."""
        if self.config.arch != "x86_64" or self.config.strict_devmem:
            return ALLOWED
        last = ((pfn << PAGE_SHIFT) + size - 1) >> PAGE_SHIFT
        return next((v for _, _, v in self._fresh().runs(pfn, last) if v.allowed == 0),
                    ALLOWED)

    # -- read / write / mmap (spec 4.5-4.7) ---------------------------------

    def read_mem(self, p: int, count: int) -> bytes:
        """read_mem(): the bytes, or AccessError for the whole call (EFAULT, EPERM) with nothing read."""
        result = self.try_read_mem(p, count)
        if isinstance(result, Refusal):
            raise result.error()
        return result if isinstance(result, bytes) else bytes(result)

    def try_read_mem(self, p: int, count: int) -> Buffer | Refusal:
        """read_mem(), with a refusal returned rather than raised (the FUSE adapter's path: a
        refused read should cost no more than an allowed one)."""
        end = p + count - 1
        if not self.valid_phys_addr_range(p, count):
            return _refusal(errno.EFAULT, f"valid_phys_addr_range: beyond high_memory "
                                         f"({self.high_memory_end() + 1:#x})", p, end)
        if count <= 0:
            return b""
        policy = self._page_policy()
        if policy is None:
            verdict = ALLOWED
        else:
            run = policy.hit  # the run of the last access, where most accesses land again
            if not run[0] <= p >> PAGE_SHIFT <= end >> PAGE_SHIFT <= run[1]:
                run = policy.run(p >> PAGE_SHIFT)
                if end >> PAGE_SHIFT > run[1]:  # more than one run: the kernel's loop, a run at a time
                    return self._read_runs(policy, p, end)
            verdict = run[2]
        # One run: [p, end] is all allowed, all zero-filled or all refused.
        if verdict.allowed == 1:
            try:
                return self.bus.load(p, count)
            except BusFault as e:
                return _refusal(errno.EFAULT, e.reason, e.addr, end)
        if verdict.allowed == 2:  # "Show zeros for restricted memory."
            return _ZERO_PAGE if count == len(_ZERO_PAGE) else bytes(count)
        return _refusal(errno.EPERM, verdict.rule, p, end)

    def _read_runs(self, policy: PolicyMap, p: int, end: int) -> Buffer | Refusal:
        parts: list[Buffer] = []
        for first, last, verdict in policy.runs(p >> PAGE_SHIFT, end >> PAGE_SHIFT):
            start, stop = max(p, first << PAGE_SHIFT), min(end + 1, (last + 1) << PAGE_SHIFT)
            if verdict.allowed == 0:
                return _refusal(errno.EPERM, verdict.rule, start, stop - 1)
            if verdict.allowed == 2:
                parts.append(bytes(stop - start))  # "Show zeros for restricted memory."
                continue
            try:
                parts.append(self.bus.load(start, stop - start))
            except BusFault as e:
                return _refusal(errno.EFAULT, e.reason, e.addr, stop - 1)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write_mem(self, p: int, data: bytes | memoryview) -> int:
        """write_mem(): bytes written; AccessError for EPERM (earlier pages already stored) or
        EFAULT before any progress; a fault after progress is a short count."""
        end = p + len(data) - 1
        if not self.valid_phys_addr_range(p, len(data)):
            raise AccessError(errno.EFAULT, f"valid_phys_addr_range: beyond high_memory "
                                            f"({self.high_memory_end() + 1:#x})", p, end)
        view = memoryview(data)
        written = 0
        for first, last, verdict in self.page_is_allowed_runs(p >> PAGE_SHIFT, end >> PAGE_SHIFT) if data else ():
            start, stop = max(p, first << PAGE_SHIFT), min(end + 1, (last + 1) << PAGE_SHIFT)
            if verdict.allowed == 0:
                raise AccessError(errno.EPERM, verdict.rule, start, stop - 1)
            if verdict.allowed == 1:  # 2: "Skip actual writing when a page is marked as restricted."
                try:
                    self.bus.store(start, view[start - p:stop - p])
                except BusFault as e:
                    if written:
                        return written
                    raise AccessError(errno.EFAULT, e.reason, e.addr, stop - 1) from None
            written += stop - start
        return written

    def mmap_mem(self, offset: int, size: int) -> None:
        """mmap_mem()'s checks in the kernel's order; raises AccessError (EINVAL, EPERM) or returns."""
        end = offset + size - 1
        if size <= 0 or end >= _U64:
            raise AccessError(errno.EINVAL, "mmap_mem: offset + size wraps", offset, end % _U64)
        pfn = offset >> PAGE_SHIFT
        if not self.valid_mmap_phys_addr_range(pfn, size):
            raise AccessError(errno.EINVAL, "valid_mmap_phys_addr_range", offset, end)
        verdict = self.range_is_allowed(pfn, size)
        if verdict.allowed == 0:
            raise AccessError(errno.EPERM, verdict.rule, offset, end)
        verdict = self.phys_mem_access_prot_allowed(pfn, size)
        if verdict.allowed == 0:
            raise AccessError(errno.EINVAL, f"phys_mem_access_prot_allowed: {verdict.rule}", offset, end)

    def load_mapped(self, offset: int, size: int) -> Buffer:
        """What a mapping of [offset, +size) reads: mmap_mem()'s checks, then the memory (real
        pages even where read_mem() shows zeros). A fault raises AccessError(EFAULT): SIGBUS."""
        self.mmap_mem(offset, size)
        try:
            return self.bus.load(offset, size)
        except BusFault as e:
            raise AccessError(errno.EFAULT, e.reason, e.addr, offset + size - 1) from None

    def store_mapped(self, offset: int, data: bytes | memoryview) -> None:
        """A write-back of mapped pages: mmap_mem()'s checks, then the store."""
        self.mmap_mem(offset, len(data))
        try:
            self.bus.store(offset, data)
        except BusFault as e:
            raise AccessError(errno.EFAULT, e.reason, e.addr, offset + len(data) - 1) from None

