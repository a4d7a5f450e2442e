"""One simulated machine: resource tree + memory contents + devices + /dev/mem policy.

`read_mem` / `write_mem` are drivers/char/mem.c's read_mem()/write_mem() for
plain read(2)/write(2) (mapped=False) and the checks of mmap_mem() plus a
direct access for pages reached through a mapping or the page cache
(mapped=True). Every refusal raises `AccessError` and lands in the audit.
"""
from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from .audit import KERNEL, Audit, Opener
from .content import ContentMap, Kind, firmware_bytes
from .kernel.devmem import PAGE_SHIFT, DevmemConfig, PolicyMap
from .kernel.ioport import IORESOURCE_BUSY, IORESOURCE_SYSRAM, IORESOURCE_SYSTEM_RAM
from .kernel.memory_hotplug import MemoryHotplug, max_pfn_end, memory_block_size_bytes
from .kernel.resource import ResourceTree
from .physmem import SparseMemory
from .virtio_mem.device import UnpluggedAccess, VirtioMemDevice
from .virtio_mem.driver import VirtioMemDriver

ARM64_PHYS_MASK_BITS = 48


class AccessError(OSError):
    """A refused /dev/mem access: errno plus the rule that refused it."""

    def __init__(self, err: int, rule: str) -> None:
        super().__init__(err, rule)
        self.rule = rule


@dataclass
class VirtioMem:
    """A virtio-mem device (QEMU side) and the Linux driver bound to it."""

    device: VirtioMemDevice
    driver: VirtioMemDriver


@dataclass
class Machine:
    tree: ResourceTree
    config: DevmemConfig
    phys_bits: int
    name: str = "machine"
    # memhp_default_state: Debian 12's 6.1 has CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE unset (set from 6.5 on)
    auto_online_blocks: str = "offline"
    audit: Audit = field(default_factory=Audit)
    virtio: dict[str, VirtioMem] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.memory = SparseMemory(1 << self.phys_bits)
        self.hotplug = MemoryHotplug(self.tree, memory_block_size_bytes(max_pfn_end(self.tree)),
                                     self.auto_online_blocks)
        # Called with (start, size) whenever what a range reads as may have changed.
        self.on_change: list[Callable[[int, int], None]] = []
        self._maps_generation = -1

    # -- derived maps ------------------------------------------------------

    def _maps(self) -> tuple[PolicyMap, ContentMap]:
        if self._maps_generation != self.tree.generation:
            self._policy = PolicyMap(self.tree, self.config)
            self._content = ContentMap(self.tree, [(v.device.addr, v.device.addr + v.device.region_size - 1,
                                                    v.device) for v in self.virtio.values()])
            self._memblock = self._memblock_ranges()
            self._maps_generation = self.tree.generation
        return self._policy, self._content

    def _memblock_ranges(self) -> list[tuple[int, int]]:
        """arm64 memblock.memory: busy System RAM not nested in other RAM, adjacent ranges merged."""
        ranges: list[tuple[int, int]] = []
        for r, _ in self.tree.walk():
            if (r.flags & (IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY) == IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
                    and not (r.parent and r.parent.flags & IORESOURCE_SYSRAM and r.parent.flags & IORESOURCE_BUSY)):
                ranges.append((r.start, r.end))
        merged: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    @property
    def high_memory_end(self) -> int:
        """Last byte below x86 high_memory: (max_pfn << 12) - 1, raised by hotplug, never lowered."""
        return self.hotplug.high_memory_end

    @property
    def size(self) -> int:
        """Top of the physical address space (what st_size of dev/mem reports)."""
        return 1 << self.phys_bits

    def changed(self, start: int, size: int) -> None:
        for callback in self.on_change:
            callback(start, size)

    # -- the checks of drivers/char/mem.c -----------------------------------

    def valid_phys_addr_range(self, addr: int, count: int) -> bool:
        """x86: addr + count - 1 <= __pa(high_memory - 1) (u64); arm64: inside one memblock region."""
        if self.config.arch == "x86_64":
            return (addr + count - 1) % (1 << 64) <= self.high_memory_end
        self._maps()
        return any(start <= addr and addr + count - 1 <= end for start, end in self._memblock)

    def valid_mmap_phys_addr_range(self, addr: int, size: int) -> bool:
        """x86: below 2^x86_phys_bits; arm64: below PHYS_MASK."""
        bits = self.phys_bits if self.config.arch == "x86_64" else ARM64_PHYS_MASK_BITS
        return (addr + size - 1) >> bits == 0

    def _refuse(self, opener: Opener, op: str, start: int, end: int, err: int, rule: str) -> AccessError:
        self.audit.refuse(opener, op, start, end, errno.errorcode[err], rule)
        return AccessError(err, rule)

    def _plan(self, offset: int, size: int, mapped: bool, opener: Opener, op: str):
        """Page runs (first, last, allowed) of an access, or the error the kernel gives it."""
        policy, _ = self._maps()
        end = offset + size - 1
        if mapped:
            if not self.valid_mmap_phys_addr_range(offset, size):
                raise self._refuse(opener, op, offset, end, errno.EINVAL, "valid_mmap_phys_addr_range")
        elif not self.valid_phys_addr_range(offset, size):
            raise self._refuse(opener, op, offset, end, errno.EFAULT,
                               f"valid_phys_addr_range: beyond high_memory ({self.high_memory_end + 1:#x})")
        runs = list(policy.runs(offset >> PAGE_SHIFT, end >> PAGE_SHIFT)) if size else []
        for first, last, verdict in runs:
            if verdict.allowed == 0 and self.config.strict_devmem:
                refused = (max(offset, first << PAGE_SHIFT), min(end, ((last + 1) << PAGE_SHIFT) - 1))
                if not mapped and op == "write":
                    return runs, refused, verdict.rule  # earlier pages are written first
                raise self._refuse(opener, op, *refused, errno.EPERM, verdict.rule)
            if verdict.allowed == 0 and mapped and self.config.arch == "x86_64":
                # phys_mem_access_prot_allowed(): with PAT, RAM never maps even without STRICT_DEVMEM
                raise self._refuse(opener, op, offset, end, errno.EINVAL,
                                   f"phys_mem_access_prot_allowed: {verdict.rule}")
        return runs, None, ""

    def read_mem(self, offset: int, size: int, opener: Opener = KERNEL, mapped: bool = False) -> bytes:
        op = "map-read" if mapped else "read"
        runs, _, _ = self._plan(offset, size, mapped, opener, op)
        parts = []
        for first, last, verdict in runs:
            start = max(offset, first << PAGE_SHIFT)
            stop = min(offset + size, (last + 1) << PAGE_SHIFT)
            if verdict.allowed == 2 and self.config.strict_devmem and not mapped:
                parts.append(bytes(stop - start))
            else:
                parts.append(self._load(start, stop - start, opener, op))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write_mem(self, offset: int, data: bytes, opener: Opener = KERNEL, mapped: bool = False) -> int:
        op = "map-write" if mapped else "write"
        runs, refused, rule = self._plan(offset, len(data), mapped, opener, op)
        written = 0
        for first, last, verdict in runs:
            start = max(offset, first << PAGE_SHIFT)
            stop = min(offset + len(data), (last + 1) << PAGE_SHIFT)
            if refused is not None and start >= refused[0]:
                raise self._refuse(opener, op, *refused, errno.EPERM, rule)
            if not (verdict.allowed == 2 and self.config.strict_devmem and not mapped):
                try:
                    self._store(start, data[start - offset:stop - offset], opener, op)
                except AccessError:
                    if written and not mapped:
                        return written  # write_mem(): a copy fault after progress is a short write
                    raise
            written += stop - start
        return written

    # -- contents ------------------------------------------------------------

    def _load(self, offset: int, size: int, opener: Opener, op: str) -> bytes:
        _, content = self._maps()
        parts = []
        for start, n, kind, device in content.runs(offset, size):
            if kind is Kind.RAM or kind is Kind.MMIO:
                parts.append(self.memory.read(start, n))
            elif kind is Kind.FIRMWARE:
                parts.append(firmware_bytes(start, n))
            elif kind is Kind.FLOAT:
                parts.append(b"\xff" * n)
            else:
                parts.append(self._device_access(device, start, n, None, opener, op))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _store(self, offset: int, data: bytes, opener: Opener, op: str) -> None:
        _, content = self._maps()
        for start, n, kind, device in content.runs(offset, len(data)):
            piece = data[start - offset:start - offset + n]
            if kind is Kind.RAM or kind is Kind.MMIO:
                self.memory.write(start, piece)
            elif kind is Kind.DEVICE:
                self._device_access(device, start, n, piece, opener, op)

    def _device_access(self, device: VirtioMemDevice, start: int, n: int, data: bytes | None,
                       opener: Opener, op: str) -> bytes:
        """A CPU access that reached virtio-mem memory: the device decides (spec 7.1 normative rules)."""
        try:
            if data is None:
                return device.guest_read(start, n)
            device.guest_write(start, data)
            return b""
        except UnpluggedAccess as e:
            # The kernel's fault-tolerant copy fails on inaccessible memory: EFAULT; a mapping: SIGBUS.
            raise self._refuse(opener, op, start, start + n - 1, errno.EFAULT, e.strerror) from None

    # -- boot --------------------------------------------------------------

    def boot(self) -> None:
        """Probe every virtio-mem driver and let it converge on its requested size."""
        for v in self.virtio.values():
            v.driver.probe()
            v.driver.run()


