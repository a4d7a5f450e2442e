"""Big Block Mode of Linux 6.1 drivers/virtio/virtio_mem.c (spec 6.3-6.7): vm->bbm, virtio_mem_bbm_*().

Memory is plugged, added and removed per big block (bb_id, bb_size: one or
more Linux memory blocks); bb_states holds a state per big block from
first_bb_id to next_bb_id. bbm_safe_unplug is on (the 6.1 default).
Return codes are 0 or -errno.
"""
from __future__ import annotations

import errno
from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

from ..kernel.memory_hotplug import ZONE_MOVABLE
from .common import PLUGGED, UNUSED, Geometry, for_each, last_usable_id, no_next_block, plug_unused_and_new

if TYPE_CHECKING:
    from .driver import VirtioMemDriver


class BbmState(IntEnum):
    """enum virtio_mem_bbm_bb_state"""

    UNUSED = UNUSED
    PLUGGED = PLUGGED
    ADDED = 2
    FAKE_OFFLINE = 3


_B = BbmState


class Bbm:
    """vm->bbm: the Big Block Mode state of one driver and the functions working on it."""

    def __init__(self, vm: VirtioMemDriver, bb_size: int) -> None:
        self.vm = vm
        self.bb_size = bb_size
        self.first_bb_id = -(-vm.addr // bb_size)
        self.last_usable_bb_id = last_usable_id(vm.addr, 0, bb_size)
        self.bb_states = bytearray()

    @property
    def next_bb_id(self) -> int:
        return self.first_bb_id + len(self.bb_states)

    # -- block states ------------------------------------------------------------

    def bb_id_to_phys(self, bb_id: int) -> int:
        """virtio_mem_bb_id_to_phys()"""
        return bb_id * self.bb_size

    def get_bb_state(self, bb_id: int) -> BbmState:
        """virtio_mem_bbm_get_bb_state(); UNUSED for big blocks never prepared."""
        i = bb_id - self.first_bb_id
        return _B(self.bb_states[i]) if 0 <= i < len(self.bb_states) else _B.UNUSED

    def set_bb_state(self, bb_id: int, state: BbmState) -> None:
        """virtio_mem_bbm_set_bb_state()"""
        self.bb_states[bb_id - self.first_bb_id] = state

    def for_each_bb(self, state: BbmState, rev: bool = False) -> Iterator[int]:
        """virtio_mem_bbm_for_each_bb() / virtio_mem_bbm_for_each_bb_rev()"""
        return for_each(self.bb_states, self.first_bb_id, state, rev)

    def _track(self, bb_id: int) -> None:
        """Grow bb_states so that bb_id < next_bb_id."""
        self.bb_states.extend(bytes(max(0, bb_id + 1 - self.next_bb_id)))

    def prepare_next_bb(self) -> tuple[int, int]:
        """virtio_mem_bbm_prepare_next_bb(): (0, bb_id) or (-ENOSPC, 0) past last_usable_bb_id."""
        bb_id = self.next_bb_id
        if bb_id > self.last_usable_bb_id:
            return no_next_block(self.vm, bb_id, self.last_usable_bb_id), 0
        self._track(bb_id)
        return 0, bb_id

    def update_last_usable(self, usable_region_size: int) -> None:
        """The BBM part of virtio_mem_refresh_config()."""
        self.last_usable_bb_id = last_usable_id(self.vm.addr, usable_region_size, self.bb_size)

    # -- plug ------------------------------------------------------------------

    def plug_bb(self, bb_id: int) -> int:
        """virtio_mem_bbm_plug_bb(): one PLUG for the whole big block; the state is the caller's."""
        return self.vm.send_plug_request(self.bb_id_to_phys(bb_id), self.bb_size)

    def unplug_bb(self, bb_id: int) -> int:
        """virtio_mem_bbm_unplug_bb(): one UNPLUG for the whole big block; the state is the caller's."""
        return self.vm.send_unplug_request(self.bb_id_to_phys(bb_id), self.bb_size)

    def plug_and_add_bb(self, bb_id: int) -> int:
        """virtio_mem_bbm_plug_and_add_bb(): PLUG, ADDED, add; on an add failure UNPLUG (else PLUGGED)."""
        rc = self.plug_bb(bb_id)
        if rc:
            return rc
        self.set_bb_state(bb_id, _B.ADDED)
        rc = self.vm.virtio_mem_add_memory(self.bb_id_to_phys(bb_id), self.bb_size)
        if rc:
            self.set_bb_state(bb_id, _B.PLUGGED if self.unplug_bb(bb_id) else _B.UNUSED)
        return rc

    def plug_request(self, diff: int) -> int:
        """virtio_mem_bbm_plug_request(): UNUSED big blocks ascending, then new ones."""
        nb_bb = diff // self.bb_size
        if not nb_bb:
            return self.vm.why(0, f"difference {diff:#x} is smaller than a big block")
        return plug_unused_and_new(self.vm, nb_bb, 1, self.bb_size, self.for_each_bb(_B.UNUSED),
                                   self.prepare_next_bb, lambda bb_id, _: self.plug_and_add_bb(bb_id))

    # -- unplug ----------------------------------------------------------------

    def bb_is_offline(self, bb_id: int) -> bool:
        """virtio_mem_bbm_bb_is_offline()"""
        return not any(b.online for b in self.vm.hotplug.blocks_in(self.bb_id_to_phys(bb_id), self.bb_size))

    def bb_is_movable(self, bb_id: int) -> bool:
        """virtio_mem_bbm_bb_is_movable(): all online memory is ZONE_MOVABLE."""
        return all(b.zone == ZONE_MOVABLE for b in self.vm.hotplug.blocks_in(self.bb_id_to_phys(bb_id), self.bb_size)
                   if b.online)

    def offline_remove_and_unplug_bb(self, bb_id: int) -> int:
        """virtio_mem_bbm_offline_remove_and_unplug_bb() with bbm_safe_unplug.

        Fake-offlining or removing failing (-EBUSY: unmovable pages, a veto)
        rolls back to ADDED; an UNPLUG failing leaves it PLUGGED.
        """
        addr = self.bb_id_to_phys(bb_id)
        self.set_bb_state(bb_id, _B.FAKE_OFFLINE)
        rc = self.vm.fake_offline(addr, self.bb_size)
        if not rc:
            rc = self.vm.virtio_mem_offline_and_remove_memory(addr, self.bb_size)
        if rc:
            self.set_bb_state(bb_id, _B.ADDED)
            return rc
        rc = self.unplug_bb(bb_id)
        self.set_bb_state(bb_id, _B.PLUGGED if rc else _B.UNUSED)
        return rc

    def unplug_request(self, diff: int) -> int:
        """virtio_mem_bbm_unplug_request(): pass 0 offline, pass 1 movable, pass 2 any; descending bb_id.

        Busy big blocks (-EBUSY) are skipped; -EBUSY if some are left.
        """
        nb_bb = diff // self.bb_size
        if not nb_bb:
            return self.vm.why(0, f"difference {diff:#x} is smaller than a big block")
        for i in range(3):
            for bb_id in self.for_each_bb(_B.ADDED, rev=True):
                if i == 0 and not self.bb_is_offline(bb_id) or i == 1 and not self.bb_is_movable(bb_id):
                    continue
                rc = self.offline_remove_and_unplug_bb(bb_id)
                if rc == -errno.EBUSY:
                    continue
                if rc:
                    return rc
                nb_bb -= 1
                if not nb_bb:
                    return 0
            if i == 0 and not self.vm.unplug_online:
                return self.vm.why(0, "unplug_online=0: online memory is not unplugged")
        return self.vm.why(-errno.EBUSY, f"{nb_bb} big blocks could not be unplugged")

    def unplug_pending(self) -> int:
        """The BBM half of virtio_mem_unplug_pending_mb(): unplug PLUGGED (never added) big blocks."""
        for bb_id in self.for_each_bb(_B.PLUGGED):
            rc = self.unplug_bb(bb_id)
            if rc:
                return rc
            self.set_bb_state(bb_id, _B.UNUSED)
        return 0

    # -- memfs: explicit operations (explicit.py) and introspection ---------------

    def geometry(self) -> Geometry:
        return Geometry(self.first_bb_id, self.bb_size, self.bb_size, "big block")

    def explicit_state(self, bb_id: int, sb_id: int, count: int) -> tuple[int, bool, bool]:
        """(state, plugged, unplugged): a big block is its own single subblock."""
        state = self.get_bb_state(bb_id)
        return state, state != _B.UNUSED, state == _B.UNUSED

    def explicit_plug(self, bb_id: int, sb_id: int, count: int) -> int:
        """Plug and add an UNUSED big block."""
        self._track(bb_id)
        return self.plug_and_add_bb(bb_id)

    def explicit_unplug(self, bb_id: int, sb_id: int, count: int) -> int:
        """Offline, remove and unplug an added big block."""
        return self.offline_remove_and_unplug_bb(bb_id)

    def remove_all_added(self) -> int:
        """Offline and remove every added big block, descending (before UNPLUG_ALL)."""
        for bb_id in self.for_each_bb(_B.ADDED, rev=True):
            rc = self.vm.virtio_mem_offline_and_remove_memory(self.bb_id_to_phys(bb_id), self.bb_size)
            if rc:
                return rc
            self.set_bb_state(bb_id, _B.UNUSED)
        return 0

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """The driver's view of plugged memory: merged (start, end exclusive) ranges."""
        ranges: list[tuple[int, int]] = []
        for i, state in enumerate(self.bb_states):
            if state == _B.UNUSED:
                continue
            start = self.bb_id_to_phys(self.first_bb_id + i)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], start + self.bb_size)
            else:
                ranges.append((start, start + self.bb_size))
        return ranges
