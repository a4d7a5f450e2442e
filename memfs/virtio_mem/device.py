"""The hypervisor side of virtio-mem: QEMU's hw/virtio/virtio-mem.c (spec 7.1, 7.2).

One plugged/unplugged byte per device block in a bytearray, so range
questions (STATE, "which parts of this access are plugged") run at C speed
through bytearray.find and cost O(number of runs) in Python.
"""
from __future__ import annotations

import errno
from collections.abc import Callable
from typing import NamedTuple

from ..changes import MemoryChanged
from ..kernel.sizes import SZ_1M
from ..physmem import SparseMemory

VIRTIO_MEM_REQ_PLUG = 0
VIRTIO_MEM_REQ_UNPLUG = 1
VIRTIO_MEM_REQ_UNPLUG_ALL = 2
VIRTIO_MEM_REQ_STATE = 3

VIRTIO_MEM_RESP_ACK = 0
VIRTIO_MEM_RESP_NACK = 1
VIRTIO_MEM_RESP_BUSY = 2
VIRTIO_MEM_RESP_ERROR = 3

VIRTIO_MEM_STATE_PLUGGED = 0
VIRTIO_MEM_STATE_UNPLUGGED = 1
VIRTIO_MEM_STATE_MIXED = 2

VIRTIO_MEM_MIN_BLOCK_SIZE = SZ_1M
VIRTIO_MEM_USABLE_EXTENT = 256 * SZ_1M   # x86-64 and s390x
_U16_MAX = 0xFFFF
MAX_NODES = 128   # QEMU's include/sysemu/numa.h: a 'node' at or above it cannot exist


class Response(NamedTuple):
    """struct virtio_mem_resp: `state` is only meaningful for STATE."""

    type: int
    state: int = 0


class UnpluggedAccess(OSError):
    """A guest CPU access touched unplugged memory with unplugged-inaccessible=on.

    `.errno` is EFAULT; `.addr` is the first unplugged byte touched, so a
    caller can still serve the part before it.
    """

    def __init__(self, addr: int, kind: str) -> None:
        super().__init__(errno.EFAULT, f"guest {kind} of unplugged virtio-mem memory at {addr:#x}")
        self.addr = addr


class VirtioMemDevice:
    """A realized `virtio-mem-pci` device: config space, block bitmap, request handler.

    `memory` holds the backend (offset 0 = guest-physical `addr`).
    `busy` stands for QEMU's virtio_mem_is_busy() (a migration in
    progress) and for discard/prealloc failures: requests that would change
    block states then answer BUSY. `config_listeners` are called with no
    arguments on every virtio_notify_config(); `changed` with the
    guest-physical (start, size) after blocks were plugged or unplugged.
    """

    def __init__(self, id: str, addr: int, region_size: int, block_size: int, memory: SparseMemory,
                 requested_size: int = 0, node: int = 0, unplugged_inaccessible: bool = True,
                 memdev: str | None = None, changed: MemoryChanged | None = None) -> None:
        if block_size < VIRTIO_MEM_MIN_BLOCK_SIZE:
            raise ValueError(f"'block-size' property has to be at least {VIRTIO_MEM_MIN_BLOCK_SIZE:#x}")
        if block_size & (block_size - 1):
            raise ValueError("'block-size' property has to be a power of two")
        for name, value in (("requested-size", requested_size), ("memaddr", addr),
                            ("memdev size", region_size)):
            if value < 0 or value % block_size:
                raise ValueError(f"'{name}' property has to be multiples of 'block-size' ({block_size:#x})")
        if region_size == 0:
            raise ValueError("'memdev' size has to be positive")
        if not 0 <= node < MAX_NODES:  # a uint32 property naming one of the machine's (at most MAX_NODES) nodes
            raise ValueError(f"'node' property has to name one of the {MAX_NODES} possible numa nodes")
        if requested_size > region_size:
            raise ValueError(f"'requested-size' cannot exceed the memory backend size ({region_size:#x})")
        if memory.size != region_size:
            raise ValueError(f"memory backend holds {memory.size:#x} bytes, not {region_size:#x}")
        self.id = id
        self.addr = addr
        self.region_size = region_size
        self.block_size = block_size
        self.memory = memory
        self.node_id = node
        self.unplugged_inaccessible = unplugged_inaccessible
        self.memdev = memdev or f"mem-{id}"
        self.requested_size = requested_size
        self.plugged_size = 0           # QEMU's `size` property
        self.usable_region_size = 0
        self.busy = False
        self.broken = False
        self.violations = {"read": 0, "write": 0}
        self.config_listeners: list[Callable[[], None]] = []
        self.changed = changed if changed is not None else MemoryChanged()
        self._bitmap = bytearray(region_size // block_size)
        # realize(): everything starts unplugged and discarded.
        memory.discard(0, region_size)
        self._resize_usable_region(requested_size, can_shrink=True)

    # -- config ------------------------------------------------------------

    def _resize_usable_region(self, requested: int, can_shrink: bool) -> None:
        """virtio_mem_resize_usable_region()"""
        new = min(self.region_size, requested + VIRTIO_MEM_USABLE_EXTENT)
        new = -(-new // self.block_size) * self.block_size
        if not requested:
            new = 0
        if new < self.usable_region_size and not can_shrink:
            return
        self.usable_region_size = new

    def _notify_config(self) -> None:
        for fn in self.config_listeners:
            fn()

    def set_requested_size(self, size: int) -> None:
        """qom-set requested-size: validate, grow the usable region, always notify."""
        if size < 0 or size % self.block_size:
            raise ValueError(f"'requested-size' has to be multiples of 'block-size' ({self.block_size:#x})")
        if size > self.region_size:
            raise ValueError(f"'requested-size' cannot exceed the memory backend size ({self.region_size:#x})")
        if size != self.requested_size:
            self._resize_usable_region(size, can_shrink=False)
            self.requested_size = size
        self._notify_config()

    # -- block bitmap --------------------------------------------------------

    def _blocks(self, gpa: int, size: int) -> tuple[int, int]:
        first = (gpa - self.addr) // self.block_size
        return first, first + size // self.block_size

    def _all(self, gpa: int, size: int, plugged: bool) -> bool:
        """virtio_mem_is_range_plugged() / _unplugged()"""
        first, last = self._blocks(gpa, size)
        return self._bitmap.find(0 if plugged else 1, first, last) < 0

    def _valid_range(self, gpa: int, size: int) -> bool:
        """virtio_mem_valid_range(): aligned, non-empty, inside the usable region."""
        usable_end = self.addr + self.usable_region_size
        return (gpa % self.block_size == 0 and size > 0
                and self.addr <= gpa < usable_end and gpa + size <= usable_end)

    def _set_block_state(self, gpa: int, size: int, plug: bool) -> bool:
        """virtio_mem_set_block_state(); False where QEMU returns -EBUSY."""
        if self.busy:
            return False
        if not plug:
            self.memory.discard(gpa - self.addr, size)
        first, last = self._blocks(gpa, size)
        self._bitmap[first:last] = (b"\x01" if plug else b"\x00") * (last - first)
        return True

    # -- requests ------------------------------------------------------------

    def state_change_request(self, gpa: int, nb_blocks: int, plug: bool) -> int:
        """virtio_mem_state_change_request(): PLUG / UNPLUG in QEMU's order of checks; an ACK signals `changed`."""
        size = nb_blocks * self.block_size
        if not self._valid_range(gpa, size):
            return VIRTIO_MEM_RESP_ERROR
        if plug and self.plugged_size + size > self.requested_size:
            return VIRTIO_MEM_RESP_NACK
        if not self._all(gpa, size, plugged=not plug):
            return VIRTIO_MEM_RESP_ERROR
        if not self._set_block_state(gpa, size, plug):
            return VIRTIO_MEM_RESP_BUSY
        self.plugged_size += size if plug else -size
        self.changed(gpa, size)
        return VIRTIO_MEM_RESP_ACK

    def unplug_all_request(self) -> int:
        """virtio_mem_unplug_all_request(): discard everything (signalling `changed`), shrink the usable region."""
        if self.plugged_size:
            if self.busy:
                return VIRTIO_MEM_RESP_BUSY
            self.memory.discard(0, self.region_size)
            self._bitmap[:] = bytes(len(self._bitmap))
            self.plugged_size = 0
            self.changed(self.addr, self.region_size)
        self._resize_usable_region(self.requested_size, can_shrink=True)
        return VIRTIO_MEM_RESP_ACK

    def state_request(self, gpa: int, nb_blocks: int) -> Response:
        """virtio_mem_state_request()"""
        size = nb_blocks * self.block_size
        if not self._valid_range(gpa, size):
            return Response(VIRTIO_MEM_RESP_ERROR)
        if self._all(gpa, size, plugged=True):
            return Response(VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)
        if self._all(gpa, size, plugged=False):
            return Response(VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED)
        return Response(VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)

    def handle_request(self, req_type: int, addr: int = 0, nb_blocks: int = 0) -> Response | None:
        """virtio_mem_handle_request(): None when the device is broken (virtio_error)."""
        if not 0 <= nb_blocks <= _U16_MAX:
            raise ValueError(f"nb_blocks {nb_blocks} does not fit the le16 request field")
        if self.broken:
            return None
        if req_type in (VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG):
            return Response(self.state_change_request(addr, nb_blocks, req_type == VIRTIO_MEM_REQ_PLUG))
        if req_type == VIRTIO_MEM_REQ_UNPLUG_ALL:
            return Response(self.unplug_all_request())
        if req_type == VIRTIO_MEM_REQ_STATE:
            return self.state_request(addr, nb_blocks)
        self.broken = True   # virtio_error(): "unknown request type"
        return None

    # -- guest CPU access ----------------------------------------------------

    def plugged_runs(self, addr: int, length: int) -> list[tuple[int, int, bool]]:
        """Cover [addr, addr+length) with (start, end exclusive, plugged) runs."""
        if length < 0 or addr < self.addr or addr + length > self.addr + self.region_size:
            raise ValueError(f"[{addr:#x}, +{length:#x}) is outside virtio-mem {self.id!r}")
        end = addr + length
        bs = self.block_size
        i = (addr - self.addr) // bs
        last = -(-(end - self.addr) // bs)
        runs = []
        while i < last:
            plugged = self._bitmap[i]
            j = self._bitmap.find(0 if plugged else 1, i, last)
            if j < 0:
                j = last
            runs.append((max(addr, self.addr + i * bs), min(end, self.addr + j * bs), bool(plugged)))
            i = j
        return runs

    def _guest_access(self, addr: int, length: int, kind: str) -> list[tuple[int, int, bool]]:
        """Spec 7.1 access rules: touching unplugged memory is a violation, always counted."""
        runs = self.plugged_runs(addr, length)
        hole = next((start for start, _, plugged in runs if not plugged), None)
        if hole is not None:
            self.violations[kind] += 1
            if self.unplugged_inaccessible:
                raise UnpluggedAccess(hole, kind)
        return runs

    def guest_read(self, addr: int, length: int) -> bytes:
        """A CPU read: unplugged parts read as zeros (the shared zero page) when accessible."""
        runs = self._guest_access(addr, length, "read")
        out = bytearray(length)
        for start, end, plugged in runs:
            if plugged:
                out[start - addr:end - addr] = self.memory.read(start - self.addr, end - start)
        return bytes(out)

    def guest_write(self, addr: int, data: bytes | memoryview) -> None:
        """A CPU write: writes to unplugged parts are dropped when accessible."""
        runs = self._guest_access(addr, len(data), "write")
        view = memoryview(data)
        for start, end, plugged in runs:
            if plugged:
                self.memory.write(start - self.addr, view[start - addr:end - addr])

    # -- monitor -------------------------------------------------------------

    def info_memory_devices(self) -> str:
        """HMP `info memory-devices` for this device."""
        return (f'Memory device [virtio-mem]: "{self.id}"\n'
                f"  memaddr: {self.addr:#x}\n"
                f"  node: {self.node_id}\n"
                f"  requested-size: {self.requested_size}\n"
                f"  size: {self.plugged_size}\n"
                f"  max-size: {self.region_size}\n"
                f"  block-size: {self.block_size}\n"
                f"  memdev: /objects/{self.memdev}\n")
