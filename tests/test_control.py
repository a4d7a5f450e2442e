"""The control language, table-driven, in the model: every failure is a clear error and changes nothing."""
from __future__ import annotations

import errno

import pytest

from memfs.control import MAX_COMMAND, Control, ControlError
from memfs.kernel.iomem import render
from memfs.loader import load_machine

GIB = 1 << 30
MIB = 1 << 20


def state(m) -> tuple:
    """Everything a command could change: the tree, devices, drivers' plugged ranges, memory blocks."""
    devices = tuple((v.device.requested_size, v.device.plugged_size, v.device.usable_region_size,
                     tuple(v.driver.plugged_ranges())) for v in m.virtio.values())
    blocks = tuple((mb_id, m.hotplug.block(mb_id).state) for mb_id in sorted(m.hotplug.blocks))
    return render(m.tree, True), devices, blocks, m.hotplug.high_memory_end


FAILURES = [
    (b"", errno.EINVAL, "empty command"),
    (b"   \n", errno.EINVAL, "empty command"),
    (b"virtio7 requested-size 1G", errno.ENODEV, "no virtio-mem device 'virtio7'"),
    (b"vmem9 unplug-all", errno.ENODEV, "devices: virtio0 (virtio0)"),
    (b"virtio0", errno.EINVAL, "cannot parse 'virtio0'"),
    (b"virtio0 requested-size", errno.EINVAL, "cannot parse"),
    (b"virtio0 requested-size 1G 2G", errno.EINVAL, "cannot parse"),
    (b"virtio0 requested-size lots", errno.EINVAL, "bad size 'lots'"),
    (b"virtio0 requested-size -1G", errno.EINVAL, "negative"),
    (b"virtio0 requested-size 3M", errno.EINVAL, "multiples of 'block-size'"),
    (b"virtio0 requested-size 5G", errno.EINVAL, "cannot exceed"),
    (b"virtio0 plug 0x100000000", errno.EINVAL, "cannot parse"),
    (b"virtio0 plug zz 2M", errno.EINVAL, "bad address 'zz'"),
    (b"virtio0 plug 0x100000001 2M", errno.EINVAL, ""),
    (b"virtio0 unplug 0x300000000 2M", errno.ERANGE, ""),
    (b"virtio0 frobnicate", errno.EINVAL, "cannot parse 'virtio0 frobnicate'"),
    (b"help me", errno.ENODEV, "no virtio-mem device 'help'"),
    (b"virtio0 requested-size \xff1G", errno.EINVAL, "not UTF-8"),
    (b"help " + b" " * MAX_COMMAND + b"virtio0 unplug-all", errno.EINVAL, "nothing was run"),
]


@pytest.mark.parametrize("command,err,needle", FAILURES, ids=[c[:40].decode("latin-1") for c, _, _ in FAILURES])
def test_failed_commands_are_clear_and_change_nothing(command, err, needle):
    m = load_machine()
    before = state(m)
    with pytest.raises(ControlError) as e:
        Control(m).execute(command)
    assert e.value.errno == err
    assert needle in str(e.value)
    assert e.value.result().startswith(f"error: {errno.errorcode[err]}: ")
    assert state(m) == before


def test_requested_size_converges_and_names_work():
    m = load_machine()
    c = Control(m)
    assert c.execute(b"virtio0 requested-size 2G\n").startswith("ok: virtio0 requested-size 2147483648: converged")
    assert m.virtio["virtio0"].device.plugged_size == 2 * GIB
    # the QEMU id names the same device
    assert "converged" in c.execute(b"vmem0 requested-size 1G".replace(b"vmem0", m.virtio["virtio0"].device.id.encode()))
    assert m.virtio["virtio0"].device.plugged_size == GIB


def test_unplug_and_plug_exact_ranges():
    m = load_machine()
    c = Control(m)
    driver = m.virtio["virtio0"].driver
    assert c.execute(b"virtio0 unplug 0x130000000 2M").startswith("ok: virtio0 unplugged [0x130000000-0x1301fffff]")
    assert not any(s <= 0x130000000 < e for s, e in driver.plugged_ranges())
    assert c.execute(b"virtio0 plug 0x130000000 2M").startswith("ok: virtio0 plugged [0x130000000-0x1301fffff]")
    assert any(s <= 0x130000000 and 0x130200000 <= e for s, e in driver.plugged_ranges())


def test_help_and_banner_list_the_commands():
    m = load_machine()
    c = Control(m)
    assert "DEV requested-size SIZE" in c.execute(b"help")
    banner = c.banner()
    assert banner.startswith("ok: machine qemu-q35-2G; policy arch=x86_64 STRICT_DEVMEM=y")
    assert "memhp_default_state=online" in banner
