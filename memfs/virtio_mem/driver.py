"""The guest side of virtio-mem: Linux 6.1 drivers/virtio/virtio_mem.c (spec 6.2-6.8).

Both modes share one layout. A *unit* is what gets added to Linux: a memory
block in SBM, a big block in BBM. Units are tracked from `first_id` up to
`next_id` (exclusive) with one state each and a plugged byte per subblock;
in BBM a big block is its own single subblock, which is all the kernel's
bbm code needs. Function names follow the kernel's; return codes are 0 or a
negative errno as in the kernel, and only the public entry points turn them
into results or exceptions.

Not modelled: the page allocator (fake-offlining a subblock always
succeeds), kdump, suspend, driver removal, timers (run() reports the retry
delay the kernel would arm; `work_pending` says the kernel would have queued
the work item).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum

from ..kernel.ioport import IORESOURCE_BUSY, IORESOURCE_EXCLUSIVE, IORESOURCE_SYSTEM_RAM, Resource
from ..kernel.memory_hotplug import (
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    ZONE_MOVABLE,
    HotplugError,
    MemoryBlock,
    MemoryHotplug,
)
from ..kernel.resource import ResourceConflict
from .device import (
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VirtioMemDevice,
)

MiB = 1 << 20
PAGEBLOCK_SIZE = 2 * MiB                   # x86-64 pageblock_nr_pages * PAGE_SIZE
VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD = 1024 * MiB
VIRTIO_MEM_RETRY_TIMER_MIN_MS = 50_000
VIRTIO_MEM_RETRY_TIMER_MAX_MS = 300_000
PLUGGABLE_END = (1 << 46) - 1              # mhp_get_pluggable_range(): MAX_PHYSMEM_BITS 46
RESOURCE_NAME = "System RAM (virtio_mem)"


class SbmState(IntEnum):
    """enum virtio_mem_sbm_mb_state"""

    UNUSED = 0
    PLUGGED = 1
    OFFLINE = 2
    OFFLINE_PARTIAL = 3
    KERNEL = 4
    KERNEL_PARTIAL = 5
    MOVABLE = 6
    MOVABLE_PARTIAL = 7


class BbmState(IntEnum):
    """enum virtio_mem_bbm_bb_state"""

    UNUSED = 0
    PLUGGED = 1
    ADDED = 2
    FAKE_OFFLINE = 3


# Both state machines start with these two values.
UNUSED = 0
PLUGGED = 1

_S = SbmState
_PARTIAL_OF = {_S.OFFLINE: _S.OFFLINE_PARTIAL, _S.KERNEL: _S.KERNEL_PARTIAL, _S.MOVABLE: _S.MOVABLE_PARTIAL}
_FULL_OF = {v: k for k, v in _PARTIAL_OF.items()}
_OFFLINE_OF = {_S.KERNEL: _S.OFFLINE, _S.MOVABLE: _S.OFFLINE,
               _S.KERNEL_PARTIAL: _S.OFFLINE_PARTIAL, _S.MOVABLE_PARTIAL: _S.OFFLINE_PARTIAL}
_ONLINE_OF = {(_S.OFFLINE, False): _S.KERNEL, (_S.OFFLINE, True): _S.MOVABLE,
              (_S.OFFLINE_PARTIAL, False): _S.KERNEL_PARTIAL, (_S.OFFLINE_PARTIAL, True): _S.MOVABLE_PARTIAL}
_SBM_OFFLINE = (_S.OFFLINE, _S.OFFLINE_PARTIAL)
_SBM_ADDED = (_S.OFFLINE, _S.OFFLINE_PARTIAL, _S.KERNEL, _S.KERNEL_PARTIAL, _S.MOVABLE, _S.MOVABLE_PARTIAL)
_SBM_PLUG_ORDER = (_S.KERNEL_PARTIAL, _S.MOVABLE_PARTIAL, _S.OFFLINE_PARTIAL)
_SBM_UNPLUG_ORDER = (_S.OFFLINE_PARTIAL, _S.OFFLINE, _S.MOVABLE_PARTIAL, _S.KERNEL_PARTIAL, _S.MOVABLE, _S.KERNEL)

_RESP_NAMES = {VIRTIO_MEM_RESP_NACK: "NACK", VIRTIO_MEM_RESP_BUSY: "BUSY", VIRTIO_MEM_RESP_ERROR: "ERROR"}
_PLUG_RC = {VIRTIO_MEM_RESP_NACK: -errno.EAGAIN, VIRTIO_MEM_RESP_BUSY: -errno.ETXTBSY,
            VIRTIO_MEM_RESP_ERROR: -errno.EINVAL}
_UNPLUG_RC = {VIRTIO_MEM_RESP_BUSY: -errno.ETXTBSY, VIRTIO_MEM_RESP_ERROR: -errno.EINVAL}


@dataclass(frozen=True)
class RunResult:
    """What one virtio_mem_run_wq() achieved.

    rc is the code its switch saw (0 or -errno); retry_ms is the retry timer
    it armed (for -ETXTBSY, -EBUSY, -ENOMEM), None otherwise.
    """

    rc: int
    reason: str
    plugged_size: int
    requested_size: int
    retry_ms: int | None = None

    @property
    def converged(self) -> bool:
        return self.plugged_size == self.requested_size


class VirtioMemDriver:
    """struct virtio_mem: one driver instance bound to one device."""

    def __init__(self, device: VirtioMemDevice, hotplug: MemoryHotplug, dev_name: str = "virtio0",
                 *, unplug_online: bool = True, force_bbm: bool = False) -> None:
        self.device = device
        self.hotplug = hotplug
        self.tree = hotplug.tree
        self.dev_name = dev_name
        self.unplug_online = unplug_online
        self.force_bbm = force_bbm
        # Stands for vm->resource_name: one pointer per driver, so only this
        # device's resources merge with each other.
        self._name_token = object()
        self.parent_resource: Resource | None = None
        self.log: list[str] = []
        self.broken = False
        self.unplug_all_required = False
        self.config_changed = False
        self.work_pending = False
        self._wq_active = False
        self._reason = ""
        self.last_result: RunResult | None = None
        self.retry_timer_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
        self.offline_size = 0
        self._states: list[int] = []
        self._sb = bytearray()
        self._init_from_config()

    def _dev_log(self, level: str, msg: str) -> None:
        self.log.append(f"{level}: virtio_mem {self.dev_name}: {msg}")

    # -- probe -------------------------------------------------------------

    def _init_from_config(self) -> None:
        """virtio_mem_init(): read the fixed config, pick SBM or BBM and their sizes."""
        dev = self.device
        mb_size = self.hotplug.block_size
        self.plugged_size = dev.plugged_size
        self.requested_size = 0
        self.device_block_size = dev.block_size
        self.nid = dev.node_id
        self.addr = dev.addr
        self.region_size = dev.region_size
        if self.addr % mb_size:
            self._dev_log("warn", "The alignment of the physical start address can make some memory unusable.")
        if (self.addr + self.region_size) % mb_size:
            self._dev_log("warn", "The alignment of the physical end address can make some memory unusable.")
        if self.addr + self.region_size - 1 > PLUGGABLE_END:
            self._dev_log("warn", "Some device memory is not addressable/pluggable. "
                                  "This can make some memory unusable.")
        self.offline_threshold = max(2 * mb_size, VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD)
        sb_size = max(dev.block_size, PAGEBLOCK_SIZE)
        self.in_sbm = sb_size < mb_size and not self.force_bbm
        if self.in_sbm:
            self.unit_size, self.sb_size = mb_size, sb_size
        else:
            self.unit_size = self.sb_size = max(dev.block_size, mb_size)
            self.offline_threshold = max(2 * self.unit_size, self.offline_threshold)
        self.sbs_per_unit = self.unit_size // self.sb_size
        self.first_id = -(-self.addr // self.unit_size)
        self.next_id = self.first_id
        self.last_usable_id = self._last_usable_id(0)
        for text in (f"start address: {self.addr:#x}", f"region size: {self.region_size:#x}",
                     f"device block size: {dev.block_size:#x}", f"memory block size: {mb_size:#x}",
                     f"subblock size: {self.sb_size:#x}" if self.in_sbm else f"big block size: {self.unit_size:#x}"):
            self._dev_log("info", text)

    def probe(self) -> None:
        """The rest of virtio_mem_probe(): container resource, notifiers, first work item."""
        if self.parent_resource is not None:
            raise HotplugError(errno.EBUSY, f"{self.dev_name}: already probed")
        try:
            res = self.tree.request_region(self.addr, self.region_size, self.dev_name,
                                           IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE)
        except ResourceConflict as e:
            self._dev_log("warn", "could not reserve device region")
            self._dev_log("info", "reloading the driver is not supported")
            raise HotplugError(errno.EBUSY, f"{self.dev_name}: could not reserve device region "
                                            f"(reloading the driver is not supported): {e}") from None
        # "The memory is not actually busy - make add_memory() work."
        self.tree.set_flags(res, res.flags & ~IORESOURCE_BUSY)
        self.parent_resource = res
        if self.plugged_size:
            self.unplug_all_required = True
            self._dev_log("info", "unplugging all memory is required")
        self.hotplug.register_memory_notifier(self._memory_notifier_cb)
        self.device.config_listeners.append(self.config_changed_cb)
        self.config_changed = True
        self.work_pending = True

    def config_changed_cb(self) -> None:
        """virtio_mem_config_changed()"""
        self.config_changed = True
        self.work_pending = True

    # -- small helpers -----------------------------------------------------

    def _why(self, rc: int, text: str) -> int:
        """Remember the first reason a run or operation stopped; pass rc through."""
        if not self._reason:
            self._reason = text
        return rc

    def _last_usable_id(self, usable_region_size: int) -> int:
        end = min(self.addr + usable_region_size - 1, PLUGGABLE_END)
        last = end // self.unit_size
        return last if (end + 1) % self.unit_size == 0 else last - 1

    def _unit_addr(self, uid: int) -> int:
        return uid * self.unit_size

    def _bit(self, uid: int, sb: int = 0) -> int:
        return (uid - self.first_id) * self.sbs_per_unit + sb

    def state(self, uid: int) -> int:
        if not self.first_id <= uid < self.next_id:
            return UNUSED
        return self._states[uid - self.first_id]

    def _set_state(self, uid: int, state: int) -> None:
        self._states[uid - self.first_id] = state

    def _ids_in(self, state: int, reverse: bool = False):
        """virtio_mem_{sbm,bbm}_for_each_{mb,bb}[_rev](): state checked at each visit."""
        ids = range(self.next_id - 1, self.first_id - 1, -1) if reverse else range(self.first_id, self.next_id)
        for uid in ids:
            if self._states[uid - self.first_id] == state:
                yield uid

    def _test_plugged(self, uid: int, sb: int, count: int) -> bool:
        bit = self._bit(uid, sb)
        return self._sb.find(0, bit, bit + count) < 0

    def _test_unplugged(self, uid: int, sb: int, count: int) -> bool:
        bit = self._bit(uid, sb)
        return self._sb.find(1, bit, bit + count) < 0

    def _set_sb(self, uid: int, sb: int, count: int, plugged: bool) -> None:
        bit = self._bit(uid, sb)
        self._sb[bit:bit + count] = (b"\x01" if plugged else b"\x00") * count

    def _could_add_memory(self, size: int) -> bool:
        """virtio_mem_could_add_memory(): keep offline memory under offline_threshold."""
        return self.offline_size + size <= self.offline_threshold

    def _track(self, uid: int) -> None:
        """Grow the state array and subblock bitmap so that uid < next_id."""
        grow = uid + 1 - self.next_id
        if grow > 0:
            self._states.extend([UNUSED] * grow)
            self._sb.extend(bytes(grow * self.sbs_per_unit))
            self.next_id = uid + 1

    def _prepare_next(self) -> tuple[int, int]:
        """virtio_mem_sbm_prepare_next_mb() / virtio_mem_bbm_prepare_next_bb()"""
        uid = self.next_id
        if uid > self.last_usable_id:
            return self._why(-errno.ENOSPC, f"no usable block left: next {uid}, "
                                            f"last usable {self.last_usable_id}"), 0
        self._track(uid)
        return 0, uid

    # -- requests to the device ----------------------------------------------

    def _send_state_change(self, uid: int, sb: int, count: int, plug: bool) -> int:
        """virtio_mem_send_plug_request() / virtio_mem_send_unplug_request()"""
        if self.config_changed:
            return -errno.EAGAIN
        addr = self._unit_addr(uid) + sb * self.sb_size
        size = count * self.sb_size
        resp = self.device.handle_request(VIRTIO_MEM_REQ_PLUG if plug else VIRTIO_MEM_REQ_UNPLUG,
                                          addr, size // self.device_block_size)
        kind = resp.type if resp is not None else None
        if kind == VIRTIO_MEM_RESP_ACK:
            self.plugged_size += size if plug else -size
            self._set_sb(uid, sb, count, plug)
            return 0
        rc = (_PLUG_RC if plug else _UNPLUG_RC).get(kind, -errno.ENOMEM)
        return self._why(rc, f"device answered {_RESP_NAMES.get(kind, 'nothing')} to "
                             f"{'PLUG' if plug else 'UNPLUG'} {addr:#x}+{size:#x}")

    def _plug_sb(self, uid: int, sb: int, count: int) -> int:
        """virtio_mem_sbm_plug_sb() / virtio_mem_bbm_plug_bb()"""
        return self._send_state_change(uid, sb, count, plug=True)

    def _unplug_sb(self, uid: int, sb: int, count: int) -> int:
        """virtio_mem_sbm_unplug_sb() / virtio_mem_bbm_unplug_bb()"""
        return self._send_state_change(uid, sb, count, plug=False)

    def _send_unplug_all_request(self) -> int:
        """virtio_mem_send_unplug_all_request()"""
        resp = self.device.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL)
        kind = resp.type if resp is not None else None
        if kind == VIRTIO_MEM_RESP_ACK:
            self.unplug_all_required = False
            self.plugged_size = 0
            self._sb[:] = bytes(len(self._sb))
            self.config_changed = True   # the usable region may have shrunk
            return 0
        rc = -errno.ETXTBSY if kind == VIRTIO_MEM_RESP_BUSY else -errno.ENOMEM
        return self._why(rc, f"device answered {_RESP_NAMES.get(kind, 'nothing')} to UNPLUG_ALL")

    # -- adding / removing memory to Linux --------------------------------

    def _add_memory(self, uid: int) -> int:
        """virtio_mem_add_memory(): account offline memory first, it may get onlined at once."""
        size = self.unit_size
        self.offline_size += size
        try:
            self.hotplug.add_memory_driver_managed(self._unit_addr(uid), size, RESOURCE_NAME,
                                                   self._name_token, nid=self.nid)
        except HotplugError as e:
            self.offline_size -= size
            self._dev_log("warn", f"adding memory failed: {-e.errno}")
            return self._why(-e.errno, f"adding memory failed: {e.strerror}")
        return 0

    def _remove_memory(self, uid: int, offline: bool) -> int:
        """virtio_mem_offline_and_remove_memory() (offline=True) / virtio_mem_remove_memory()"""
        addr, size = self._unit_addr(uid), self.unit_size
        try:
            if offline:
                self.hotplug.offline_and_remove_memory(addr, size)
            else:
                self.hotplug.remove_memory(addr, size)
        except HotplugError as e:
            # Since "virtio-mem: convert most offline_and_remove_memory() errors
            # to -EBUSY" a veto means "retry later", not a broken device.
            rc = -errno.ENOMEM if e.errno == errno.ENOMEM else -errno.EBUSY
            return self._why(rc, f"removing memory {addr:#x}+{size:#x} failed: {e.strerror}")
        self.offline_size -= size
        self.work_pending = True   # virtio_mem_retry(): freed memory may allow more unplug
        return 0

    def _memory_notifier_cb(self, action: int, block: MemoryBlock) -> None:
        """virtio_mem_memory_notifier_cb() for the actions that matter without an allocator."""
        if not (block.start < self.addr + self.region_size and self.addr < block.start + block.size):
            return
        uid = block.start // self.unit_size
        if action == MEM_GOING_ONLINE and self.in_sbm and self.state(uid) not in _SBM_OFFLINE:
            self._dev_log("warn", "memory block onlining denied")
            raise HotplugError(errno.EPERM, f"{self.dev_name}: memory block onlining denied")
        if action == MEM_OFFLINE:
            if self.in_sbm:
                self._set_state(uid, _OFFLINE_OF[self.state(uid)])
            self.offline_size += block.size
            if not self.unplug_online:
                self.work_pending = True
        elif action == MEM_ONLINE:
            if self.in_sbm:
                self._set_state(uid, _ONLINE_OF[self.state(uid), block.zone == ZONE_MOVABLE])
            self.offline_size -= block.size
            # Start adding more memory once half the threshold was onlined.
            if not self._wq_active and self._could_add_memory(self.offline_threshold // 2):
                self.work_pending = True

    # -- SBM plug ------------------------------------------------------------

    def _sbm_mark_full(self, uid: int, old: int) -> None:
        """A PARTIAL block whose subblocks are now all plugged loses the PARTIAL."""
        if self._test_plugged(uid, 0, self.sbs_per_unit):
            self._set_state(uid, _FULL_OF[old])

    def _plug_and_add(self, uid: int, sb: int, count: int) -> int:
        """virtio_mem_sbm_plug_and_add_mb() / virtio_mem_bbm_plug_and_add_bb().

        Plugs before adding so that onlining sees the plugged subblocks; the
        state is set before adding so the memory notifier finds it offline.
        """
        rc = self._plug_sb(uid, sb, count)
        if rc:
            return rc
        if self.in_sbm:
            full = self._test_plugged(uid, 0, self.sbs_per_unit)
            self._set_state(uid, _S.OFFLINE if full else _S.OFFLINE_PARTIAL)
        else:
            self._set_state(uid, BbmState.ADDED)
        rc = self._add_memory(uid)
        if rc:
            self._set_state(uid, PLUGGED if self._unplug_sb(uid, sb, count) else UNUSED)
        return rc

    def _sbm_plug_any_sb(self, uid: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_plug_any_sb(): fill the lowest unplugged runs of an added block."""
        old = self.state(uid)
        base = self._bit(uid)
        while nb_sb:
            first = self._sb.find(0, base, base + self.sbs_per_unit)
            if first < 0:
                break
            stop = self._sb.find(1, first, min(base + self.sbs_per_unit, first + nb_sb))
            count = (stop if stop >= 0 else min(base + self.sbs_per_unit, first + nb_sb)) - first
            rc = self._plug_sb(uid, first - base, count)
            if rc:
                return rc, nb_sb
            nb_sb -= count
        self._sbm_mark_full(uid, old)
        return 0, nb_sb

    def _sbm_plug_request(self, diff: int) -> int:
        """virtio_mem_sbm_plug_request()"""
        nb_sb = diff // self.sb_size
        if not nb_sb:
            return self._why(0, f"difference {diff:#x} is smaller than a subblock")
        for state in _SBM_PLUG_ORDER:
            for uid in self._ids_in(state):
                rc, nb_sb = self._sbm_plug_any_sb(uid, nb_sb)
                if rc or not nb_sb:
                    return rc
        return self._plug_unused_and_new(nb_sb)

    def _plug_unused_and_new(self, nb_sb: int) -> int:
        """The tail both plug requests share: UNUSED units ascending, then brand-new ones.

        Each unit must fit under offline_threshold, gets one PLUG for its first
        subblocks (BBM: the whole big block, sbs_per_unit == 1) and is then added.
        """
        unused = self._ids_in(UNUSED)
        while nb_sb:
            if not self._could_add_memory(self.unit_size):
                return self._threshold_reached()
            uid = next(unused, None)
            if uid is None:
                rc, uid = self._prepare_next()
                if rc:
                    return rc
            count = min(nb_sb, self.sbs_per_unit)
            rc = self._plug_and_add(uid, 0, count)
            if rc:
                return rc
            nb_sb -= count
        return 0

    def _threshold_reached(self) -> int:
        return self._why(-errno.ENOSPC, f"offline memory {self.offline_size:#x} would exceed "
                                        f"offline_threshold {self.offline_threshold:#x}")

    # -- SBM unplug ----------------------------------------------------------

    def _sbm_unplug_any_sb_raw(self, uid: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb_raw(): highest plugged runs first, one request per run."""
        sb = self.sbs_per_unit - 1
        while nb_sb:
            while sb >= 0 and self._test_unplugged(uid, sb, 1):
                sb -= 1
            if sb < 0:
                break
            count = 1
            while count < nb_sb and sb > 0 and self._test_plugged(uid, sb - 1, 1):
                count += 1
                sb -= 1
            rc = self._unplug_sb(uid, sb, count)
            if rc:
                return rc, nb_sb
            nb_sb -= count
            sb -= 1
        return 0, nb_sb

    def _sbm_finish_offline_unplug(self, uid: int) -> None:
        """Tail of virtio_mem_sbm_unplug_any_sb_offline(): a fully unplugged block goes away."""
        if not self._test_plugged(uid, 0, self.sbs_per_unit):
            self._set_state(uid, _S.OFFLINE_PARTIAL)
        if self._test_unplugged(uid, 0, self.sbs_per_unit):
            # UNUSED first, so that a racing onlining is vetoed.
            self._set_state(uid, UNUSED)
            rc = self._remove_memory(uid, offline=False)
            assert rc == 0, "remove_memory of an offline virtio-mem block failed"   # BUG_ON(rc)

    def _sbm_unplug_any_sb_offline(self, uid: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb_offline()"""
        rc, nb_sb = self._sbm_unplug_any_sb_raw(uid, nb_sb)
        # Some subblocks may be gone even on failure; a failed run stays
        # plugged, so the block is never removed then.
        self._sbm_finish_offline_unplug(uid)
        return rc, nb_sb

    def _sbm_unplug_sb_online(self, uid: int, sb: int, count: int) -> int:
        """virtio_mem_sbm_unplug_sb_online(): fake-offline (always succeeds here), then UNPLUG."""
        old = self.state(uid)
        rc = self._unplug_sb(uid, sb, count)
        if rc:
            return rc
        if old in (_S.KERNEL, _S.MOVABLE):
            self._set_state(uid, _PARTIAL_OF[old])
        return 0

    def _sbm_finish_online_unplug(self, uid: int) -> None:
        """Tail of virtio_mem_sbm_unplug_any_sb_online(): offline and remove an empty block.

        A failure is not an error: the block stays PARTIAL (6.1).
        """
        if self._test_unplugged(uid, 0, self.sbs_per_unit) and not self._remove_memory(uid, offline=True):
            self._set_state(uid, UNUSED)

    def _sbm_unplug_any_sb_online(self, uid: int, nb_sb: int) -> tuple[int, int]:
        """virtio_mem_sbm_unplug_any_sb_online(): whole block in one go if possible, else one by one."""
        if nb_sb >= self.sbs_per_unit and self._test_plugged(uid, 0, self.sbs_per_unit):
            rc = self._sbm_unplug_sb_online(uid, 0, self.sbs_per_unit)
            if rc:
                return rc, nb_sb
            nb_sb -= self.sbs_per_unit
        else:
            sb = self.sbs_per_unit - 1
            while sb >= 0 and nb_sb:
                while sb >= 0 and not self._test_plugged(uid, sb, 1):
                    sb -= 1
                if sb < 0:
                    break
                rc = self._sbm_unplug_sb_online(uid, sb, 1)
                if rc:
                    return rc, nb_sb
                nb_sb -= 1
                sb -= 1
        self._sbm_finish_online_unplug(uid)
        return 0, nb_sb

    def _sbm_unplug_request(self, diff: int) -> int:
        """virtio_mem_sbm_unplug_request(): partial and offline blocks first, descending ids."""
        nb_sb = diff // self.sb_size
        if not nb_sb:
            return self._why(0, f"difference {diff:#x} is smaller than a subblock")
        for i, state in enumerate(_SBM_UNPLUG_ORDER):
            for uid in self._ids_in(state, reverse=True):
                if state in _SBM_OFFLINE:
                    rc, nb_sb = self._sbm_unplug_any_sb_offline(uid, nb_sb)
                else:
                    rc, nb_sb = self._sbm_unplug_any_sb_online(uid, nb_sb)
                if rc or not nb_sb:
                    return rc
            if not self.unplug_online and i == 1:
                return self._why(0, "unplug_online=0: online memory is not unplugged")
        return self._why(-errno.EBUSY, f"{nb_sb} subblocks could not be unplugged")

    # -- BBM -------------------------------------------------------------------

    def _bbm_plug_request(self, diff: int) -> int:
        """virtio_mem_bbm_plug_request(): UNUSED big blocks ascending, then new ones."""
        nb_bb = diff // self.unit_size
        if not nb_bb:
            return self._why(0, f"difference {diff:#x} is smaller than a big block")
        return self._plug_unused_and_new(nb_bb)

    def _bbm_blocks(self, uid: int) -> list[MemoryBlock]:
        return list(self.hotplug.blocks_in(self._unit_addr(uid), self.unit_size))

    def _bbm_offline_remove_and_unplug_bb(self, uid: int) -> int:
        """virtio_mem_bbm_offline_remove_and_unplug_bb() with bbm_safe_unplug."""
        self._set_state(uid, BbmState.FAKE_OFFLINE)
        rc = self._remove_memory(uid, offline=True)
        if rc:
            self._set_state(uid, BbmState.ADDED)
            return rc
        rc = self._unplug_sb(uid, 0, 1)
        self._set_state(uid, PLUGGED if rc else UNUSED)
        return rc

    def _bbm_unplug_request(self, diff: int) -> int:
        """virtio_mem_bbm_unplug_request(): pass 0 offline, pass 1 movable, pass 2 any."""
        nb_bb = diff // self.unit_size
        if not nb_bb:
            return self._why(0, f"difference {diff:#x} is smaller than a big block")
        for i in range(3):
            for uid in self._ids_in(BbmState.ADDED, reverse=True):
                blocks = self._bbm_blocks(uid)
                if i == 0 and any(b.online for b in blocks):
                    continue
                if i == 1 and any(b.online and b.zone != ZONE_MOVABLE for b in blocks):
                    continue
                rc = self._bbm_offline_remove_and_unplug_bb(uid)
                if rc == -errno.EBUSY:
                    continue
                if rc:
                    return rc
                nb_bb -= 1
                if not nb_bb:
                    return 0
            if i == 0 and not self.unplug_online:
                return self._why(0, "unplug_online=0: online memory is not unplugged")
        return self._why(-errno.EBUSY, f"{nb_bb} big blocks could not be unplugged")

    # -- the work item -------------------------------------------------------

    def _refresh_config(self) -> None:
        """virtio_mem_refresh_config()"""
        dev = self.device
        if dev.plugged_size != self.plugged_size:
            self._dev_log("warn", f"plugged size {dev.plugged_size:#x} differs from ours "
                                  f"{self.plugged_size:#x}; adopting it")
            self.plugged_size = dev.plugged_size
        self.last_usable_id = self._last_usable_id(dev.usable_region_size)
        self.requested_size = dev.requested_size
        self._dev_log("info", f"plugged size: {self.plugged_size:#x}")
        self._dev_log("info", f"requested size: {self.requested_size:#x}")

    def _unplug_pending(self) -> int:
        """virtio_mem_unplug_pending_mb(): unplug units that could not be added."""
        for uid in self._ids_in(PLUGGED):
            if self.in_sbm:
                rc, _ = self._sbm_unplug_any_sb_raw(uid, self.sbs_per_unit)
            else:
                rc = self._unplug_sb(uid, 0, 1)
            if rc:
                return rc
            self._set_state(uid, UNUSED)
        return 0

    def _converge(self) -> int:
        """One pass of virtio_mem_run_wq() between `retry:` and its switch."""
        rc = 0
        if self.unplug_all_required:
            rc = self._send_unplug_all_request()
        if self.config_changed:
            self.config_changed = False
            self._refresh_config()
        if not rc:
            rc = self._unplug_pending()
        if not rc and self.requested_size > self.plugged_size:
            diff = self.requested_size - self.plugged_size
            rc = self._sbm_plug_request(diff) if self.in_sbm else self._bbm_plug_request(diff)
        elif not rc and self.requested_size < self.plugged_size:
            diff = self.plugged_size - self.requested_size
            rc = self._sbm_unplug_request(diff) if self.in_sbm else self._bbm_unplug_request(diff)
        return rc

    def run(self) -> RunResult:
        """virtio_mem_run_wq(): converge plugged_size to requested_size, redo on -EAGAIN."""
        self._require_probed()
        self.work_pending = False
        if self.broken:
            assert self.last_result is not None
            return self.last_result
        self._wq_active = True
        try:
            while True:
                self._reason = ""
                rc = self._converge()
                if rc != -errno.EAGAIN:
                    break
        finally:
            self._wq_active = False
        retry_ms = None
        if rc == 0:
            self.retry_timer_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
        elif rc in (-errno.ETXTBSY, -errno.EBUSY, -errno.ENOMEM):
            retry_ms = self.retry_timer_ms
            # virtio_mem_timer_expired() doubles it for the next failure.
            self.retry_timer_ms = min(2 * self.retry_timer_ms, VIRTIO_MEM_RETRY_TIMER_MAX_MS)
        elif rc != -errno.ENOSPC:
            self.broken = True
            self._dev_log("err", f"unknown error, marking device broken: {rc}")
            self._reason = f"{self._reason}; device marked broken"
        if rc == 0 and self.plugged_size == self.requested_size:
            reason = "converged"
        else:
            reason = self._reason or f"stopped with {rc}"
        self.last_result = RunResult(rc, reason, self.plugged_size, self.requested_size, retry_ms)
        return self.last_result

    # -- explicit operations (control file) ---------------------------------

    def _require_probed(self) -> None:
        if self.parent_resource is None:
            raise HotplugError(errno.ENODEV, f"{self.dev_name}: driver not probed")

    def _fail(self, err: int, text: str) -> HotplugError:
        return HotplugError(err, f"{self.dev_name}: {text}")

    def _check_range(self, addr: int, size: int, plug: bool) -> list[tuple[int, int, int]]:
        """Everything plug_range/unplug_range need, checked before any change.

        Returns (unit id, first subblock, subblock count) per unit, ascending.
        """
        self._require_probed()
        if self.broken:
            raise self._fail(errno.EIO, "device is marked broken")
        if self.unplug_all_required:
            raise self._fail(errno.EBUSY, "UNPLUG_ALL is still pending; run the driver first")
        g = self.sb_size
        if size <= 0 or addr % g or size % g:
            raise self._fail(errno.EINVAL, f"{addr:#x}+{size:#x} is not aligned to the "
                                           f"{'subblock' if self.in_sbm else 'big block'} size {g:#x}")
        if addr < self.addr or addr + size > self.addr + self.region_size:
            raise self._fail(errno.ERANGE, f"{addr:#x}+{size:#x} is outside the device region "
                                           f"{self.addr:#x}+{self.region_size:#x}")
        last_usable = self._last_usable_id(self.device.usable_region_size)
        units = []
        for uid in range(addr // self.unit_size, (addr + size - 1) // self.unit_size + 1):
            ustart = self._unit_addr(uid)
            if not self.first_id <= uid <= last_usable:
                raise self._fail(errno.ERANGE, f"block {ustart:#x}+{self.unit_size:#x} is not inside "
                                               f"the usable region")
            lo, hi = max(addr, ustart), min(addr + size, ustart + self.unit_size)
            sb, count = (lo - ustart) // g, (hi - lo) // g
            state = self.state(uid)
            if state == PLUGGED:
                raise self._fail(errno.EBUSY, f"block {ustart:#x} awaits cleanup; run the driver first")
            tracked = uid < self.next_id
            if plug and tracked and not self._test_unplugged(uid, sb, count):
                raise self._fail(errno.EBUSY, f"{lo:#x}-{hi - 1:#x} is partly plugged already")
            if not plug and (not tracked or not self._test_plugged(uid, sb, count)):
                raise self._fail(errno.EBUSY, f"{lo:#x}-{hi - 1:#x} is not entirely plugged")
            if plug and state == UNUSED and next(self.tree.overlapping(
                    ustart, ustart + self.unit_size - 1, root=self.parent_resource), None):
                raise self._fail(errno.EBUSY, f"block {ustart:#x} is occupied in the resource tree")
            units.append((uid, sb, count))
        if self.device.busy:
            raise self._fail(errno.EBUSY, "the device is busy")
        if plug and self.device.plugged_size + size > self.device.requested_size:
            raise self._fail(errno.ENOSPC, f"plugging {size:#x} would exceed requested-size "
                                           f"{self.device.requested_size:#x} (device NACK)")
        return units

    def _apply(self, rc: int) -> None:
        if rc:
            raise self._fail(-rc, self._reason or f"failed: {rc}")

    def _sync_config(self) -> None:
        """Requests are refused with -EAGAIN while a config change is unread."""
        self._reason = ""
        if self.config_changed:
            self.config_changed = False
            self._refresh_config()

    def plug_range(self, addr: int, size: int) -> None:
        """Plug exactly [addr, addr+size): one PLUG per unit, adding units that were not added.

        Skips the offline_threshold (an explicit order, not the work item).
        """
        units = self._check_range(addr, size, plug=True)
        self._sync_config()
        for uid, sb, count in units:
            self._track(uid)
            old = self.state(uid)
            if old == UNUSED:
                self._apply(self._plug_and_add(uid, sb, count))
            else:
                self._apply(self._plug_sb(uid, sb, count))
                self._sbm_mark_full(uid, old)

    def unplug_range(self, addr: int, size: int) -> None:
        """Unplug exactly [addr, addr+size); units left without plugged memory are removed."""
        units = self._check_range(addr, size, plug=False)
        self._sync_config()
        for uid, sb, count in reversed(units):
            if not self.in_sbm:
                self._apply(self._bbm_offline_remove_and_unplug_bb(uid))
            elif self.state(uid) in _SBM_OFFLINE:
                self._apply(self._unplug_sb(uid, sb, count))
                self._sbm_finish_offline_unplug(uid)
            else:
                self._apply(self._sbm_unplug_sb_online(uid, sb, count))
                self._sbm_finish_online_unplug(uid)

    def unplug_all(self) -> None:
        """Remove every added unit from Linux, then one UNPLUG_ALL (the usable region may shrink)."""
        self._require_probed()
        if self.broken:
            raise self._fail(errno.EIO, "device is marked broken")
        if self.device.busy:
            raise self._fail(errno.EBUSY, "the device is busy")
        self._reason = ""
        added = _SBM_ADDED if self.in_sbm else (BbmState.ADDED,)
        for uid in range(self.next_id - 1, self.first_id - 1, -1):
            if self.state(uid) in added:
                self._apply(self._remove_memory(uid, offline=True))
                self._set_state(uid, UNUSED)
        self._apply(self._send_unplug_all_request())
        self._states = [UNUSED] * len(self._states)

    # -- introspection -------------------------------------------------------

    def mb_state(self, mb_id: int) -> SbmState:
        """SBM state of Linux memory block mb_id (UNUSED if never prepared)."""
        assert self.in_sbm
        return SbmState(self.state(mb_id))

    def bb_state(self, bb_id: int) -> BbmState:
        assert not self.in_sbm
        return BbmState(self.state(bb_id))

    def plugged_subblocks(self, uid: int) -> list[int]:
        """Plugged subblock numbers of a unit, ascending."""
        if not self.first_id <= uid < self.next_id:
            return []
        base = self._bit(uid)
        return [i for i in range(self.sbs_per_unit) if self._sb[base + i]]

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """The driver's view of plugged memory: merged (start, end exclusive) ranges."""
        ranges = []
        i = self._sb.find(1)
        while i >= 0:
            j = self._sb.find(0, i)
            if j < 0:
                j = len(self._sb)
            ranges.append((self._addr_of_bit(i), self._addr_of_bit(j)))
            i = self._sb.find(1, j)
        return ranges

    def _addr_of_bit(self, bit: int) -> int:
        uid, sb = divmod(bit, self.sbs_per_unit)
        return self._unit_addr(self.first_id + uid) + sb * self.sb_size
