"""The guest side of virtio-mem: Linux 6.1 drivers/virtio/virtio_mem.c (spec 6.2-6.8), struct virtio_mem.

Here: what both modes share (init, probe, config, device requests, adding and removing
memory, the memory notifier, the work item); sbm.py / bbm.py: vm->sbm / vm->bbm;
explicit.py: the control file's operations. Return codes are 0 or -errno as in the
kernel; only the public entry points turn them into results or exceptions.
Of the page allocator only unmovable kernel memory is modelled (unmovable.py).
Not modelled: kdump, suspend, driver removal, timers (run() reports the retry delay the
kernel would arm; `work_pending` says the kernel would have queued the work item).
"""
from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

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
from ..kernel.sizes import SZ_1G, SZ_1M
from . import explicit
from .bbm import Bbm
from .common import PLUGGABLE_END
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
from .sbm import Sbm
from .unmovable import DEFAULT_UNMOVABLE_SIZE, place_unmovable

PAGEBLOCK_SIZE = 2 * SZ_1M                 # x86-64 pageblock_nr_pages * PAGE_SIZE
VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD = SZ_1G
VIRTIO_MEM_RETRY_TIMER_MIN_MS = 50_000
VIRTIO_MEM_RETRY_TIMER_MAX_MS = 300_000
RESOURCE_NAME = "System RAM (virtio_mem)"

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
    """struct virtio_mem: one driver instance bound to one device.

    `mode` is vm->sbm (an Sbm; vm->in_sbm) or vm->bbm (a Bbm).
    `unplug_online` and `force_bbm` are the module parameters;
    `unmovable_size` is how much unmovable kernel memory lands in the
    device's memory (0: none, every block can be emptied).
    """

    def __init__(self, device: VirtioMemDevice, hotplug: MemoryHotplug, dev_name: str = "virtio0",
                 *, unplug_online: bool = True, force_bbm: bool = False,
                 unmovable_size: int = DEFAULT_UNMOVABLE_SIZE) -> None:
        if unmovable_size < 0:
            raise ValueError(f"unmovable_size {unmovable_size} is negative")
        self.device = device
        self.hotplug = hotplug
        self.tree = hotplug.tree
        self.dev_name = dev_name
        self.unplug_online = unplug_online
        self.force_bbm = force_bbm
        self.unmovable_size = unmovable_size
        # The block holding the unmovable pages, once some block took them.
        self.unmovable_mb_id: int | None = None
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
        self.reason = ""
        self.last_result: RunResult | None = None
        self.retry_timer_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
        self.offline_size = 0
        self._init()

    def dev_log(self, level: str, msg: str) -> None:
        self.log.append(f"{level}: virtio_mem {self.dev_name}: {msg}")

    def why(self, rc: int, text: str) -> int:
        """Remember the first reason a run or operation stopped; pass rc through."""
        if not self.reason:
            self.reason = text
        return rc

    # -- init and probe -------------------------------------------------------

    def _init(self) -> None:
        """virtio_mem_init() and virtio_mem_init_hotplug(): read the fixed config, pick SBM or BBM."""
        dev = self.device
        mb_size = self.hotplug.block_size
        self.plugged_size = dev.plugged_size
        self.requested_size = 0
        self.device_block_size = dev.block_size
        self.nid = dev.node_id
        self.addr = dev.addr
        self.region_size = dev.region_size
        if self.addr % mb_size:
            self.dev_log("warn", "The alignment of the physical start address can make some memory unusable.")
        if (self.addr + self.region_size) % mb_size:
            self.dev_log("warn", "The alignment of the physical end address can make some memory unusable.")
        if self.addr + self.region_size - 1 > PLUGGABLE_END:
            self.dev_log("warn", "Some device memory is not addressable/pluggable. "
                                 "This can make some memory unusable.")
        self.offline_threshold = max(2 * mb_size, VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD)
        self.mode = self.new_mode()
        if isinstance(self.mode, Sbm):
            size_text = f"subblock size: {self.mode.sb_size:#x}"
        else:
            self.offline_threshold = max(2 * self.mode.bb_size, self.offline_threshold)
            size_text = f"big block size: {self.mode.bb_size:#x}"
        for text in (f"start address: {self.addr:#x}", f"region size: {self.region_size:#x}",
                     f"device block size: {dev.block_size:#x}", f"memory block size: {mb_size:#x}", size_text):
            self.dev_log("info", text)

    def new_mode(self) -> Sbm | Bbm:
        """vm->sbm or vm->bbm as virtio_mem_init_hotplug() sets them up: nothing tracked yet."""
        mb_size = self.hotplug.block_size
        sb_size = max(self.device_block_size, PAGEBLOCK_SIZE)
        if sb_size < mb_size and not self.force_bbm:
            return Sbm(self, sb_size)
        return Bbm(self, max(self.device_block_size, mb_size))

    def probe(self) -> None:
        """The rest of virtio_mem_probe(): container resource, notifiers, first work item.

        Raises HotplugError(EBUSY) if the region is taken (nothing changes).
        """
        if self.parent_resource is not None:
            raise HotplugError(errno.EBUSY, f"{self.dev_name}: already probed")
        try:
            res = self.tree.request_region(self.addr, self.region_size, self.dev_name,
                                           IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE)
        except ResourceConflict as e:
            self.dev_log("warn", "could not reserve device region")
            self.dev_log("info", "reloading the driver is not supported")
            raise HotplugError(errno.EBUSY, f"{self.dev_name}: could not reserve device region "
                                            f"(reloading the driver is not supported): {e}") from None
        # "The memory is not actually busy - make add_memory() work."
        self.tree.set_flags(res, res.flags & ~IORESOURCE_BUSY)
        self.parent_resource = res
        if self.plugged_size:
            self.unplug_all_required = True
            self.dev_log("info", "unplugging all memory is required")
        self.hotplug.register_memory_notifier(self._memory_notifier_cb)
        self.device.config_listeners.append(self.config_changed_cb)
        self.config_changed = True
        self.work_pending = True

    def require_probed(self) -> None:
        """HotplugError(ENODEV) before probe."""
        if self.parent_resource is None:
            raise HotplugError(errno.ENODEV, f"{self.dev_name}: driver not probed")

    def config_changed_cb(self) -> None:
        """virtio_mem_config_changed()"""
        self.config_changed = True
        self.work_pending = True

    def could_add_memory(self, size: int) -> bool:
        """virtio_mem_could_add_memory(): keep offline memory under offline_threshold."""
        return self.offline_size + size <= self.offline_threshold

    # -- requests to the device ------------------------------------------------

    def send_plug_request(self, addr: int, size: int) -> int:
        """virtio_mem_send_plug_request(): ACK grows plugged_size; NACK -EAGAIN, BUSY -ETXTBSY, ERROR -EINVAL."""
        return self._send_state_change(VIRTIO_MEM_REQ_PLUG, addr, size)

    def send_unplug_request(self, addr: int, size: int) -> int:
        """virtio_mem_send_unplug_request(): ACK shrinks plugged_size; BUSY -ETXTBSY, ERROR -EINVAL."""
        return self._send_state_change(VIRTIO_MEM_REQ_UNPLUG, addr, size)

    def _send_state_change(self, req_type: int, addr: int, size: int) -> int:
        """What both senders share: -EAGAIN while a config change is unread, any other answer -ENOMEM."""
        if self.config_changed:
            return -errno.EAGAIN
        plug = req_type == VIRTIO_MEM_REQ_PLUG
        resp = self.device.handle_request(req_type, addr, size // self.device_block_size)
        kind = resp.type if resp is not None else -1
        if kind == VIRTIO_MEM_RESP_ACK:
            self.plugged_size += size if plug else -size
            return 0
        rc = (_PLUG_RC if plug else _UNPLUG_RC).get(kind, -errno.ENOMEM)
        return self.why(rc, f"device answered {_RESP_NAMES.get(kind, 'nothing')} to "
                            f"{'PLUG' if plug else 'UNPLUG'} {addr:#x}+{size:#x}")

    def send_unplug_all_request(self) -> int:
        """virtio_mem_send_unplug_all_request(): ACK zeroes plugged_size and rereads the config."""
        resp = self.device.handle_request(VIRTIO_MEM_REQ_UNPLUG_ALL)
        kind = resp.type if resp is not None else -1
        if kind == VIRTIO_MEM_RESP_ACK:
            self.unplug_all_required = False
            self.plugged_size = 0
            self.config_changed = True   # the usable region may have shrunk
            return 0
        rc = -errno.ETXTBSY if kind == VIRTIO_MEM_RESP_BUSY else -errno.ENOMEM
        return self.why(rc, f"device answered {_RESP_NAMES.get(kind, 'nothing')} to UNPLUG_ALL")

    # -- adding / removing memory to Linux (prefixed: mm's own are MemoryHotplug's) --

    def virtio_mem_add_memory(self, addr: int, size: int) -> int:
        """virtio_mem_add_memory(): offline memory is counted first, as it may get onlined at once."""
        self.offline_size += size
        try:
            self.hotplug.add_memory_driver_managed(addr, size, RESOURCE_NAME, self._name_token, nid=self.nid)
        except HotplugError as e:
            self.offline_size -= size
            self.dev_log("warn", f"adding memory failed: {-e.errno}")
            return self.why(-e.errno, f"adding memory failed: {e.strerror}")
        return 0

    def virtio_mem_remove_memory(self, addr: int, size: int) -> int:
        """virtio_mem_remove_memory(): remove offline memory."""
        return self._remove(self.hotplug.remove_memory, addr, size)

    def virtio_mem_offline_and_remove_memory(self, addr: int, size: int) -> int:
        """virtio_mem_offline_and_remove_memory()"""
        return self._remove(self.hotplug.offline_and_remove_memory, addr, size)

    def _remove(self, remove: Callable[[int, int], None], addr: int, size: int) -> int:
        """What both removers share: on success less offline memory and the work item queued."""
        try:
            remove(addr, size)
        except HotplugError as e:
            # Since "virtio-mem: convert most offline_and_remove_memory() errors
            # to -EBUSY" a veto means "retry later", not a broken device.
            rc = -errno.ENOMEM if e.errno == errno.ENOMEM else -errno.EBUSY
            return self.why(rc, f"removing memory {addr:#x}+{size:#x} failed: {e.strerror}")
        self.offline_size -= size
        self.work_pending = True   # virtio_mem_retry(): freed memory may allow more unplug
        return 0

    def fake_offline(self, addr: int, size: int) -> int:
        """virtio_mem_fake_offline(): alloc_contig_range() takes online pages, -EBUSY on unmovable ones."""
        block = self.hotplug.has_unmovable_pages(addr, size)
        if block is None:
            return 0
        return self.why(-errno.EBUSY, f"{block.unmovable_reason()}: cannot fake-offline {addr:#x}+{size:#x}")

    # -- memory notifier ---------------------------------------------------------

    def _memory_notifier_cb(self, action: int, block: MemoryBlock) -> None:
        """virtio_mem_memory_notifier_cb() for the actions that matter without an allocator."""
        if not (block.start < self.addr + self.region_size and self.addr < block.start + block.size):
            return
        sbm = self.mode if isinstance(self.mode, Sbm) else None
        if action == MEM_GOING_ONLINE and sbm:
            sbm.notify_going_online(block.id)
        elif action == MEM_OFFLINE:
            if sbm:
                sbm.notify_offline(block.id)
            self.offline_size += block.size
            if not self.unplug_online:
                self.work_pending = True
        elif action == MEM_ONLINE:
            if sbm:
                sbm.notify_online(block.id, block.zone == ZONE_MOVABLE)
            self.offline_size -= block.size
            place_unmovable(self, block)
            # Start adding more memory once half the threshold was onlined.
            if not self._wq_active and self.could_add_memory(self.offline_threshold // 2):
                self.work_pending = True

    # -- the work item -------------------------------------------------------

    def refresh_config(self) -> None:
        """virtio_mem_refresh_config(): adopt the device's plugged size, reread usable and requested size."""
        dev = self.device
        if dev.plugged_size != self.plugged_size:
            self.dev_log("warn", f"plugged size {dev.plugged_size:#x} differs from ours "
                                 f"{self.plugged_size:#x}; adopting it")
            self.plugged_size = dev.plugged_size
        self.mode.update_last_usable(dev.usable_region_size)
        self.requested_size = dev.requested_size
        self.dev_log("info", f"plugged size: {self.plugged_size:#x}")
        self.dev_log("info", f"requested size: {self.requested_size:#x}")

    def _run_wq_once(self) -> int:
        """One pass of virtio_mem_run_wq() from its `retry:` label to its switch: the rc it switches on."""
        rc = 0
        if self.unplug_all_required:
            rc = self.send_unplug_all_request()
        if self.config_changed:
            self.config_changed = False
            self.refresh_config()
        if not rc:
            rc = self.mode.unplug_pending()   # virtio_mem_unplug_pending_mb()
        if not rc and self.requested_size > self.plugged_size:
            rc = self.mode.plug_request(self.requested_size - self.plugged_size)
        elif not rc and self.requested_size < self.plugged_size:
            rc = self.mode.unplug_request(self.plugged_size - self.requested_size)
        return rc

    def run(self) -> RunResult:
        """virtio_mem_run_wq(): converge plugged_size on requested_size, at once again on -EAGAIN.

        Retry timer on -ETXTBSY/-EBUSY/-ENOMEM, stop on -ENOSPC, else broken. ENODEV before probe.
        """
        self.require_probed()
        self.work_pending = False
        if self.broken:
            assert self.last_result is not None
            return self.last_result
        self._wq_active = True
        try:
            while True:
                self.reason = ""
                rc = self._run_wq_once()
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
            self.dev_log("err", f"unknown error, marking device broken: {rc}")
            self.reason = f"{self.reason}; device marked broken"
        if rc == 0 and self.plugged_size == self.requested_size:
            reason = "converged"
        else:
            reason = self.reason or f"stopped with {rc}"
        self.last_result = RunResult(rc, reason, self.plugged_size, self.requested_size, retry_ms)
        return self.last_result

    # -- memfs: explicit operations (control file) and introspection ----------------

    def plug_range(self, addr: int, size: int) -> None:
        """Plug exactly [addr, addr+size) (explicit.plug_range)."""
        explicit.plug_range(self, addr, size)

    def unplug_range(self, addr: int, size: int) -> None:
        """Unplug exactly [addr, addr+size) (explicit.unplug_range)."""
        explicit.unplug_range(self, addr, size)

    def unplug_all(self) -> None:
        """Remove everything from Linux, then UNPLUG_ALL (explicit.unplug_all)."""
        explicit.unplug_all(self)

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """The driver's view of plugged memory: merged (start, end exclusive) ranges."""
        return self.mode.plugged_ranges()
