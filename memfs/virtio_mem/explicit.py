"""memfs's explicit operations on a virtio-mem driver: the control file's plug, unplug and unplug-all.

Not kernel paths (a real guest only converges on requested_size): they
reuse the driver's own steps (virtio_mem_sbm_plug_sb(),
virtio_mem_add_memory(), ...), skip the offline_threshold, and check
everything first, so a refused operation raises HotplugError and changes
nothing.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..kernel.memory_hotplug import HotplugError
from .common import PLUGGED, UNUSED, last_usable_id

if TYPE_CHECKING:
    from .driver import VirtioMemDriver

# (mb_id or bb_id, first sb_id, subblock count); a big block is one subblock.
Span = tuple[int, int, int]


def _fail(vm: VirtioMemDriver, err: int, text: str) -> HotplugError:
    return HotplugError(err, f"{vm.dev_name}: {text}")


def _require_working(vm: VirtioMemDriver) -> None:
    """Probed and not broken (EIO)."""
    vm.require_probed()
    if vm.broken:
        raise _fail(vm, errno.EIO, "device is marked broken")


def _require_idle(vm: VirtioMemDriver) -> None:
    """A device that is not busy (EBUSY)."""
    if vm.device.busy:
        raise _fail(vm, errno.EBUSY, "the device is busy")


def _check_explicit_range(vm: VirtioMemDriver, addr: int, size: int, plug: bool) -> list[Span]:
    """Everything plug_range/unplug_range need, checked before any change: the spans, ascending.

    Raises HotplugError: EINVAL (misaligned), ERANGE (outside the region or
    usable region), EBUSY (wrong state, cleanup or UNPLUG_ALL pending, tree
    occupied, unmovable pages, device busy), ENOSPC (beyond requested-size).
    """
    _require_working(vm)
    if vm.unplug_all_required:
        raise _fail(vm, errno.EBUSY, "UNPLUG_ALL is still pending; run the driver first")
    geo = vm.mode.geometry()
    g = geo.granule
    if size <= 0 or addr % g or size % g:
        raise _fail(vm, errno.EINVAL, f"{addr:#x}+{size:#x} is not aligned to the {geo.unit} size {g:#x}")
    if addr < vm.addr or addr + size > vm.addr + vm.region_size:
        raise _fail(vm, errno.ERANGE, f"{addr:#x}+{size:#x} is outside the device region "
                                      f"{vm.addr:#x}+{vm.region_size:#x}")
    last_usable = last_usable_id(vm.addr, vm.device.usable_region_size, geo.block_size)
    spans = []
    for block_id in range(addr // geo.block_size, (addr + size - 1) // geo.block_size + 1):
        start = block_id * geo.block_size
        if not geo.first_id <= block_id <= last_usable:
            raise _fail(vm, errno.ERANGE, f"block {start:#x}+{geo.block_size:#x} is not inside the usable region")
        lo, hi = max(addr, start), min(addr + size, start + geo.block_size)
        sb_id, count = (lo - start) // g, (hi - lo) // g
        state, plugged, unplugged = vm.mode.explicit_state(block_id, sb_id, count)
        if state == PLUGGED:
            raise _fail(vm, errno.EBUSY, f"block {start:#x} awaits cleanup; run the driver first")
        if plug and not unplugged:
            raise _fail(vm, errno.EBUSY, f"{lo:#x}-{hi - 1:#x} is partly plugged already")
        if not plug and not plugged:
            raise _fail(vm, errno.EBUSY, f"{lo:#x}-{hi - 1:#x} is not entirely plugged")
        if plug and state == UNUSED and next(vm.tree.overlapping(
                start, start + geo.block_size - 1, root=vm.parent_resource), None):
            raise _fail(vm, errno.EBUSY, f"block {start:#x} is occupied in the resource tree")
        holder = None if plug else vm.hotplug.has_unmovable_pages(lo, hi - lo)
        if holder is not None:
            raise _fail(vm, errno.EBUSY, f"{lo:#x}-{hi - 1:#x}: {holder.unmovable_reason()}")
        spans.append((block_id, sb_id, count))
    _require_idle(vm)
    if plug and vm.device.plugged_size + size > vm.device.requested_size:
        raise _fail(vm, errno.ENOSPC, f"plugging {size:#x} would exceed requested-size "
                                      f"{vm.device.requested_size:#x} (device NACK)")
    return spans


def _apply(vm: VirtioMemDriver, rc: int) -> None:
    if rc:
        raise _fail(vm, -rc, vm.reason or f"failed: {rc}")


def _sync_config(vm: VirtioMemDriver) -> None:
    """Requests are refused with -EAGAIN while a config change is unread: read it first."""
    vm.reason = ""
    if vm.config_changed:
        vm.config_changed = False
        vm.refresh_config()


def plug_range(vm: VirtioMemDriver, addr: int, size: int) -> None:
    """Plug exactly [addr, addr+size): one PLUG per block, adding blocks that were not added."""
    spans = _check_explicit_range(vm, addr, size, plug=True)
    _sync_config(vm)
    for block_id, sb_id, count in spans:
        _apply(vm, vm.mode.explicit_plug(block_id, sb_id, count))


def unplug_range(vm: VirtioMemDriver, addr: int, size: int) -> None:
    """Unplug exactly [addr, addr+size), descending; blocks left without plugged memory are removed."""
    spans = _check_explicit_range(vm, addr, size, plug=False)
    _sync_config(vm)
    for block_id, sb_id, count in reversed(spans):
        _apply(vm, vm.mode.explicit_unplug(block_id, sb_id, count))


def unplug_all(vm: VirtioMemDriver) -> None:
    """Offline and remove every added block, then one UNPLUG_ALL (the usable region may shrink).

    EBUSY, changing nothing, while unmovable pages pin a block.
    """
    _require_working(vm)
    _require_idle(vm)
    if vm.unmovable_mb_id is not None:
        holder = vm.hotplug.block(vm.unmovable_mb_id)
        raise _fail(vm, errno.EBUSY, f"{holder.unmovable_reason()}: it cannot be removed")
    vm.reason = ""
    _apply(vm, vm.mode.remove_all_added())
    _apply(vm, vm.send_unplug_all_request())
    vm.mode = vm.new_mode()
