"""Sub Block Mode of Linux 6.1 drivers/virtio/virtio_mem.c (spec 6.3-6.7): vm->sbm, virtio_mem_sbm_*().

Memory is added to Linux per memory block (mb_id) and plugged per subblock
(sb_id, sbs_per_mb per block). mb_states holds a state per block from
first_mb_id to next_mb_id, sb_states a plugged byte per subblock (so
bytearray.find does the kernel's bitmap searches). Return codes are 0 or
-errno; functions that take nb_sb return (rc, nb_sb still to do).
"""
from __future__ import annotations

import errno
from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

from ..kernel.memory_hotplug import HotplugError
from .common import PLUGGED, UNUSED, Geometry, for_each, last_usable_id, no_next_block, plug_unused_and_new

if TYPE_CHECKING:
    from .driver import VirtioMemDriver


class SbmState(IntEnum):
    """enum virtio_mem_sbm_mb_state"""

    UNUSED = UNUSED
    PLUGGED = PLUGGED
    OFFLINE = 2
    OFFLINE_PARTIAL = 3
    KERNEL = 4
    KERNEL_PARTIAL = 5
    MOVABLE = 6
    MOVABLE_PARTIAL = 7


_S = SbmState
_PARTIAL_OF = {_S.OFFLINE: _S.OFFLINE_PARTIAL, _S.KERNEL: _S.KERNEL_PARTIAL, _S.MOVABLE: _S.MOVABLE_PARTIAL}
_FULL_OF = {partial: full for full, partial in _PARTIAL_OF.items()}
_OFFLINE_OF = {_S.KERNEL: _S.OFFLINE, _S.MOVABLE: _S.OFFLINE,
               _S.KERNEL_PARTIAL: _S.OFFLINE_PARTIAL, _S.MOVABLE_PARTIAL: _S.OFFLINE_PARTIAL}
_ONLINE_OF = {(_S.OFFLINE, False): _S.KERNEL, (_S.OFFLINE, True): _S.MOVABLE,
              (_S.OFFLINE_PARTIAL, False): _S.KERNEL_PARTIAL, (_S.OFFLINE_PARTIAL, True): _S.MOVABLE_PARTIAL}
_OFFLINE = (_S.OFFLINE, _S.OFFLINE_PARTIAL)
_PLUG_ORDER = (_S.KERNEL_PARTIAL, _S.MOVABLE_PARTIAL, _S.OFFLINE_PARTIAL)
_UNPLUG_ORDER = (_S.OFFLINE_PARTIAL, _S.OFFLINE, _S.MOVABLE_PARTIAL, _S.KERNEL_PARTIAL, _S.MOVABLE, _S.KERNEL)


class Sbm:
    """vm->sbm: the Sub Block Mode state of one driver and the functions working on it."""

    def __init__(self, vm: VirtioMemDriver, sb_size: int) -> None:
        self.vm = vm
        self.mb_size = vm.hotplug.block_size          # memory_block_size_bytes()
        self.sb_size = sb_size
        self.sbs_per_mb = self.mb_size // sb_size
        self.first_mb_id = -(-vm.addr // self.mb_size)
        self.last_usable_mb_id = last_usable_id(vm.addr, 0, self.mb_size)
        self.mb_states = bytearray()
        self.sb_states = bytearray()

    @property
    def next_mb_id(self) -> int:
        return self.first_mb_id + len(self.mb_states)

    # -- block states and the subblock bitmap ----------------------------------

    def mb_id_to_phys(self, mb_id: int) -> int:
        """virtio_mem_mb_id_to_phys()"""
        return mb_id * self.mb_size

    def get_mb_state(self, mb_id: int) -> SbmState:
        """virtio_mem_sbm_get_mb_state(); UNUSED for blocks never prepared."""
        i = mb_id - self.first_mb_id
        return _S(self.mb_states[i]) if 0 <= i < len(self.mb_states) else _S.UNUSED

    def set_mb_state(self, mb_id: int, state: SbmState) -> None:
        """virtio_mem_sbm_set_mb_state()"""
        self.mb_states[mb_id - self.first_mb_id] = state

    def for_each_mb(self, state: SbmState, rev: bool = False) -> Iterator[int]:
        """virtio_mem_sbm_for_each_mb() / virtio_mem_sbm_for_each_mb_rev()"""
        return for_each(self.mb_states, self.first_mb_id, state, rev)

    def sb_state_bit_nr(self, mb_id: int, sb_id: int) -> int:
        """virtio_mem_sbm_sb_state_bit_nr()"""
        return (mb_id - self.first_mb_id) * self.sbs_per_mb + sb_id

    def set_sb_states(self, mb_id: int, sb_id: int, count: int, plugged: bool) -> None:
        """virtio_mem_sbm_set_sb_plugged() / virtio_mem_sbm_set_sb_unplugged()"""
        bit = self.sb_state_bit_nr(mb_id, sb_id)
        self.sb_states[bit:bit + count] = (b"\x01" if plugged else b"\x00") * count

    def test_sb_plugged(self, mb_id: int, sb_id: int, count: int) -> bool:
        """virtio_mem_sbm_test_sb_plugged()"""
        bit = self.sb_state_bit_nr(mb_id, sb_id)
        return self.sb_states.find(0, bit, bit + count) < 0

    def test_sb_unplugged(self, mb_id: int, sb_id: int, count: int) -> bool:
        """virtio_mem_sbm_test_sb_unplugged()"""
        bit = self.sb_state_bit_nr(mb_id, sb_id)
        return self.sb_states.find(1, bit, bit + count) < 0

    def first_unplugged_sb(self, mb_id: int) -> int:
        """virtio_mem_sbm_first_unplugged_sb(): sbs_per_mb if every subblock is plugged."""
        bit = self.sb_state_bit_nr(mb_id, 0)
        found = self.sb_states.find(0, bit, bit + self.sbs_per_mb)
        return self.sbs_per_mb if found < 0 else found - bit

    def _track(self, mb_id: int) -> None:
        """Grow mb_states and sb_states so that mb_id < next_mb_id."""
        grow = mb_id + 1 - self.next_mb_id
        if grow > 0:
            self.mb_states.extend(bytes(grow))
            self.sb_states.extend(bytes(grow * self.sbs_per_mb))

    def prepare_next_mb(self) -> tuple[int, int]:
        """virtio_mem_sbm_prepare_next_mb(): (0, mb_id) or (-ENOSPC, 0) past last_usable_mb_id."""
        mb_id = self.next_mb_id
        if mb_id > self.last_usable_mb_id:
            return no_next_block(self.vm, mb_id, self.last_usable_mb_id), 0
        self._track(mb_id)
        return 0, mb_id

    def update_last_usable(self, usable_region_size: int) -> None:
        """The SBM part of virtio_mem_refresh_config()."""
        self.last_usable_mb_id = last_usable_id(self.vm.addr, usable_region_size, self.mb_size)

    # -- plug ------------------------------------------------------------------

    def plug_sb(self, mb_id: int, sb_id: int, count: int) -> int:
        """virtio_mem_sbm_plug_sb(): PLUG the subblocks; marks them plugged, not the block."""
        rc = self.vm.send_plug_request(self.mb_id_to_phys(mb_id) + sb_id * self.sb_size, count * self.sb_size)
        if not rc:
            self.set_sb_states(mb_id, sb_id, count, plugged=True)
        return rc

    def unplug_sb(self, mb_id: int, sb_id: int, count: int) -> int:
        """virtio_mem_sbm_unplug_sb(): UNPLUG the subblocks; marks them unplugged, not the block."""
        rc = self.vm.send_unplug_request(self.mb_id_to_phys(mb_id) + sb_id * self.sb_size, count * self.sb_size)
        if not rc:
            self.set_sb_states(mb_id, sb_id, count, plugged=False)
        return rc

    def plug_and_add_mb(self, mb_id: int, count: int, sb_id: int = 0) -> int:
        """virtio_mem_sbm_plug_and_add_mb(): plug subblocks (the kernel: from 0), then add the block.

        Plugs before adding so onlining sees the plugged subblocks, and sets
        OFFLINE[_PARTIAL] before adding so the memory notifier finds it.
        On an add failure the subblocks are unplugged again: UNUSED, or
        PLUGGED if that failed too.
        """
        rc = self.plug_sb(mb_id, sb_id, count)
        if rc:
            return rc
        full = self.test_sb_plugged(mb_id, 0, self.sbs_per_mb)
        self.set_mb_state(mb_id, _S.OFFLINE if full else _S.OFFLINE_PARTIAL)
        rc = self.vm.virtio_mem_add_memory(self.mb_id_to_phys(mb_id), self.mb_size)
        if rc:
            self.set_mb_state(mb_id, _S.PLUGGED if self.unplug_sb(mb_id, sb_id, count) else _S.UNUSED)
        return rc

    def _mark_full(self, mb_id: int, old: SbmState) -> None:
        """The tail of virtio_mem_sbm_plug_any_sb(): a PARTIAL block now fully plugged loses PARTIAL."""
        if self.test_sb_plugged(mb_id, 0, self.sbs_per_mb):
            self.set_mb_state(mb_id, _FULL_OF[old])

    def plug_any_sb(self, mb_id: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_plug_any_sb(): fill the lowest unplugged runs of an added block, one PLUG per run."""
        old = self.get_mb_state(mb_id)
        base = self.sb_state_bit_nr(mb_id, 0)
        end = base + self.sbs_per_mb
        while nb_sb:
            first = self.sb_states.find(0, base, end)
            if first < 0:
                break
            limit = min(end, first + nb_sb)
            stop = self.sb_states.find(1, first, limit)
            count = (stop if stop >= 0 else limit) - first
            rc = self.plug_sb(mb_id, first - base, count)
            if rc:
                return rc, nb_sb
            nb_sb -= count
        self._mark_full(mb_id, old)
        return 0, nb_sb

    def plug_request(self, diff: int) -> int:
        """virtio_mem_sbm_plug_request(): partial blocks by class, then UNUSED and new blocks."""
        nb_sb = diff // self.sb_size
        if not nb_sb:
            return self.vm.why(0, f"difference {diff:#x} is smaller than a subblock")
        for state in _PLUG_ORDER:
            for mb_id in self.for_each_mb(state):
                rc, nb_sb = self.plug_any_sb(mb_id, nb_sb)
                if rc or not nb_sb:
                    return rc
        return plug_unused_and_new(self.vm, nb_sb, self.sbs_per_mb, self.mb_size, self.for_each_mb(_S.UNUSED),
                                   self.prepare_next_mb, self.plug_and_add_mb)

    # -- unplug ----------------------------------------------------------------

    def unplug_any_sb_raw(self, mb_id: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb_raw(): highest plugged runs first, one UNPLUG per run."""
        sb_id = self.sbs_per_mb - 1
        while nb_sb:
            while sb_id >= 0 and self.test_sb_unplugged(mb_id, sb_id, 1):
                sb_id -= 1
            if sb_id < 0:
                break
            count = 1
            while count < nb_sb and sb_id > 0 and self.test_sb_plugged(mb_id, sb_id - 1, 1):
                count += 1
                sb_id -= 1
            rc = self.unplug_sb(mb_id, sb_id, count)
            if rc:
                return rc, nb_sb
            nb_sb -= count
            sb_id -= 1
        return 0, nb_sb

    def unplug_mb(self, mb_id: int) -> int:
        """virtio_mem_sbm_unplug_mb(): every plugged subblock of an offline or not-added block."""
        return self.unplug_any_sb_raw(mb_id, self.sbs_per_mb)[0]

    def _unplugged_offline(self, mb_id: int) -> None:
        """The tail of virtio_mem_sbm_unplug_any_sb_offline(): PARTIAL, and removed once empty."""
        if not self.test_sb_plugged(mb_id, 0, self.sbs_per_mb):
            self.set_mb_state(mb_id, _S.OFFLINE_PARTIAL)
        if self.test_sb_unplugged(mb_id, 0, self.sbs_per_mb):
            # UNUSED first, so that a racing onlining is vetoed.
            self.set_mb_state(mb_id, _S.UNUSED)
            rc = self.vm.virtio_mem_remove_memory(self.mb_id_to_phys(mb_id), self.mb_size)
            assert rc == 0, "remove_memory of an offline virtio-mem block failed"   # BUG_ON(rc)

    def unplug_any_sb_offline(self, mb_id: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb_offline()"""
        rc, nb_sb = self.unplug_any_sb_raw(mb_id, nb_sb)
        # Some subblocks may be gone even on failure; a failed run stays
        # plugged, so the block is never removed then.
        self._unplugged_offline(mb_id)
        return rc, nb_sb

    def unplug_sb_online(self, mb_id: int, sb_id: int, count: int) -> int:
        """virtio_mem_sbm_unplug_sb_online(): fake-offline the pages (-EBUSY if unmovable), then UNPLUG."""
        old = self.get_mb_state(mb_id)
        rc = self.vm.fake_offline(self.mb_id_to_phys(mb_id) + sb_id * self.sb_size, count * self.sb_size)
        if not rc:
            rc = self.unplug_sb(mb_id, sb_id, count)
        if rc:
            return rc
        if old in (_S.KERNEL, _S.MOVABLE):
            self.set_mb_state(mb_id, _PARTIAL_OF[old])
        return 0

    def _unplugged_online(self, mb_id: int) -> None:
        """The tail of virtio_mem_sbm_unplug_any_sb_online(): offline and remove an empty block.

        A failure is not an error: the block stays PARTIAL (6.1).
        """
        if not self.test_sb_unplugged(mb_id, 0, self.sbs_per_mb):
            return
        if not self.vm.virtio_mem_offline_and_remove_memory(self.mb_id_to_phys(mb_id), self.mb_size):
            self.set_mb_state(mb_id, _S.UNUSED)

    def unplug_any_sb_online(self, mb_id: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb_online(): the whole block in one go if possible, else one by one.

        Busy subblocks (-EBUSY) are skipped, so 0 can come back with nb_sb left.
        """
        if nb_sb >= self.sbs_per_mb and self.test_sb_plugged(mb_id, 0, self.sbs_per_mb):
            rc = self.unplug_sb_online(mb_id, 0, self.sbs_per_mb)
            if not rc:
                self._unplugged_online(mb_id)
                return 0, nb_sb - self.sbs_per_mb
            if rc != -errno.EBUSY:
                return rc, nb_sb
        for sb_id in range(self.sbs_per_mb - 1, -1, -1):
            if not nb_sb:
                break
            if not self.test_sb_plugged(mb_id, sb_id, 1):
                continue
            rc = self.unplug_sb_online(mb_id, sb_id, 1)
            if rc == -errno.EBUSY:
                continue
            if rc:
                return rc, nb_sb
            nb_sb -= 1
        self._unplugged_online(mb_id)
        return 0, nb_sb

    def unplug_any_sb(self, mb_id: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb(): the offline or the online way, by the block's state."""
        if self.get_mb_state(mb_id) in _OFFLINE:
            return self.unplug_any_sb_offline(mb_id, nb_sb)
        return self.unplug_any_sb_online(mb_id, nb_sb)

    def unplug_request(self, diff: int) -> int:
        """virtio_mem_sbm_unplug_request(): by class (partial and offline first), descending mb_id.

        -EBUSY if subblocks are left that could not be unplugged.
        """
        nb_sb = diff // self.sb_size
        if not nb_sb:
            return self.vm.why(0, f"difference {diff:#x} is smaller than a subblock")
        for i, state in enumerate(_UNPLUG_ORDER):
            for mb_id in self.for_each_mb(state, rev=True):
                rc, nb_sb = self.unplug_any_sb(mb_id, nb_sb)
                if rc or not nb_sb:
                    return rc
            if not self.vm.unplug_online and i == 1:
                return self.vm.why(0, "unplug_online=0: online memory is not unplugged")
        return self.vm.why(-errno.EBUSY, f"{nb_sb} subblocks could not be unplugged")

    def unplug_pending(self) -> int:
        """The SBM half of virtio_mem_unplug_pending_mb(): unplug PLUGGED (never added) blocks."""
        for mb_id in self.for_each_mb(_S.PLUGGED):
            rc = self.unplug_mb(mb_id)
            if rc:
                return rc
            self.set_mb_state(mb_id, _S.UNUSED)
        return 0

    # -- memory notifier ---------------------------------------------------------

    def notify_going_online(self, mb_id: int) -> None:
        """virtio_mem_sbm_notify_going_online(): only OFFLINE[_PARTIAL] blocks go online (else -EPERM)."""
        if self.get_mb_state(mb_id) not in _OFFLINE:
            self.vm.dev_log("warn", "memory block onlining denied")
            raise HotplugError(errno.EPERM, f"{self.vm.dev_name}: memory block onlining denied")

    def notify_offline(self, mb_id: int) -> None:
        """virtio_mem_sbm_notify_offline()"""
        self.set_mb_state(mb_id, _OFFLINE_OF[self.get_mb_state(mb_id)])

    def notify_online(self, mb_id: int, movable: bool) -> None:
        """virtio_mem_sbm_notify_online()"""
        self.set_mb_state(mb_id, _ONLINE_OF[self.get_mb_state(mb_id), movable])

    # -- memfs: explicit operations (explicit.py) and introspection ---------------

    def geometry(self) -> Geometry:
        return Geometry(self.first_mb_id, self.mb_size, self.sb_size, "subblock")

    def explicit_state(self, mb_id: int, sb_id: int, count: int) -> tuple[int, bool, bool]:
        """(state, all plugged, all unplugged) of subblocks sb_id..sb_id+count-1."""
        if mb_id >= self.next_mb_id:
            return _S.UNUSED, False, True
        return (self.get_mb_state(mb_id), self.test_sb_plugged(mb_id, sb_id, count),
                self.test_sb_unplugged(mb_id, sb_id, count))

    def explicit_plug(self, mb_id: int, sb_id: int, count: int) -> int:
        """Plug exactly these subblocks: plug and add an UNUSED block, else plug into the added one."""
        self._track(mb_id)
        old = self.get_mb_state(mb_id)
        if old == _S.UNUSED:
            return self.plug_and_add_mb(mb_id, count, sb_id)
        rc = self.plug_sb(mb_id, sb_id, count)
        if not rc:
            self._mark_full(mb_id, old)
        return rc

    def explicit_unplug(self, mb_id: int, sb_id: int, count: int) -> int:
        """Unplug exactly these subblocks of an added block; a block left empty is removed."""
        if self.get_mb_state(mb_id) in _OFFLINE:
            rc = self.unplug_sb(mb_id, sb_id, count)
            if not rc:
                self._unplugged_offline(mb_id)
        else:
            rc = self.unplug_sb_online(mb_id, sb_id, count)
            if not rc:
                self._unplugged_online(mb_id)
        return rc

    def remove_all_added(self) -> int:
        """Offline and remove every added block, descending (before UNPLUG_ALL)."""
        for mb_id in range(self.next_mb_id - 1, self.first_mb_id - 1, -1):
            if self.get_mb_state(mb_id) not in (_S.UNUSED, _S.PLUGGED):
                rc = self.vm.virtio_mem_offline_and_remove_memory(self.mb_id_to_phys(mb_id), self.mb_size)
                if rc:
                    return rc
                self.set_mb_state(mb_id, _S.UNUSED)
        return 0

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """The driver's view of plugged memory: merged (start, end exclusive) ranges."""
        ranges = []
        bit = self.sb_states.find(1)
        while bit >= 0:
            stop = self.sb_states.find(0, bit)
            stop = len(self.sb_states) if stop < 0 else stop
            ranges.append((self._bit_phys(bit), self._bit_phys(stop)))
            bit = self.sb_states.find(1, stop)
        return ranges

    def _bit_phys(self, bit: int) -> int:
        mb_index, sb_id = divmod(bit, self.sbs_per_mb)
        return self.mb_id_to_phys(self.first_mb_id + mb_index) + sb_id * self.sb_size
