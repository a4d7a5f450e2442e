"""What drivers/virtio/virtio_mem.c's two modes share (spec 6.3-6.6).

SBM keeps a state byte per memory block (vm->sbm.mb_states, first_mb_id up
to next_mb_id), BBM one per big block (vm->bbm.bb_states, first_bb_id up to
next_bb_id); both start with UNUSED and PLUGGED. The helpers here take the
SBM or BBM fields as arguments, so sbm.py and bbm.py keep the kernel's names.
"""
from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .driver import VirtioMemDriver

# VIRTIO_MEM_SBM_MB_UNUSED == VIRTIO_MEM_BBM_BB_UNUSED, likewise PLUGGED.
UNUSED = 0
PLUGGED = 1
PLUGGABLE_END = (1 << 46) - 1              # mhp_get_pluggable_range(): MAX_PHYSMEM_BITS 46


def for_each(states: bytearray, first_id: int, state: int, rev: bool = False) -> Iterator[int]:
    """virtio_mem_sbm_for_each_mb[_rev]() / virtio_mem_bbm_for_each_bb[_rev]().

    Yields the ids in `state`; the state is checked at each visit, ids added
    while iterating are not visited.
    """
    indexes = range(len(states) - 1, -1, -1) if rev else range(len(states))
    for i in indexes:
        if states[i] == state:
            yield first_id + i


def last_usable_id(addr: int, usable_region_size: int, block_size: int) -> int:
    """last_usable_mb_id / last_usable_bb_id as virtio_mem_refresh_config() computes them.

    Only blocks lying entirely inside the usable (and pluggable) region count.
    """
    end = min(addr + usable_region_size - 1, PLUGGABLE_END)
    last = end // block_size
    return last if (end + 1) % block_size == 0 else last - 1


def plug_unused_and_new(vm: VirtioMemDriver, nb: int, per_block: int, block_size: int, unused: Iterator[int],
                        prepare_next: Callable[[], tuple[int, int]],
                        plug_and_add: Callable[[int, int], int]) -> int:
    """The tail of virtio_mem_sbm_plug_request() and virtio_mem_bbm_plug_request().

    UNUSED blocks ascending, then new ones from prepare_next (-ENOSPC past
    the last usable block): each must fit under offline_threshold
    (virtio_mem_could_add_memory(), else -ENOSPC) and gets
    plug_and_add(id, count) for the next min(nb, per_block) subblocks (SBM)
    or the whole big block (BBM, per_block 1). Returns 0 or the first error.
    """
    while nb:
        if not vm.could_add_memory(block_size):
            return vm.why(-errno.ENOSPC, f"offline memory {vm.offline_size:#x} would exceed "
                                         f"offline_threshold {vm.offline_threshold:#x}")
        block_id = next(unused, None)
        if block_id is None:
            rc, block_id = prepare_next()
            if rc:
                return rc
        count = min(nb, per_block)
        rc = plug_and_add(block_id, count)
        if rc:
            return rc
        nb -= count
    return 0


def no_next_block(vm: VirtioMemDriver, next_id: int, last_usable: int) -> int:
    """The -ENOSPC of virtio_mem_sbm_prepare_next_mb() / virtio_mem_bbm_prepare_next_bb()."""
    return vm.why(-errno.ENOSPC, f"no usable block left: next {next_id}, last usable {last_usable}")


class Geometry(NamedTuple):
    """What memfs's explicit operations (explicit.py) need to know about a mode's blocks."""

    first_id: int      # first_mb_id / first_bb_id
    block_size: int    # memory_block_size_bytes() / bb_size
    granule: int       # sb_size / bb_size: the smallest range that can be (un)plugged
    unit: str          # what a granule is called in messages
