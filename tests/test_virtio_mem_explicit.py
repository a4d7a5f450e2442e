"""memfs's explicit operations on the virtio-mem driver (control file), and random sequences of everything."""
from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtio_mem_harness import (
    BASE,
    MB,
    PLUG,
    SB,
    UNPLUG,
    Machine,
    boot_tree,
    check_invariants,
    errno_of,
    make_device,
    plugged_sb_ids,
)

from memfs.kernel.memory_hotplug import HotplugError, MemoryHotplug
from memfs.kernel.sizes import PAGE_SIZE, SZ_1G, SZ_1M
from memfs.virtio_mem.device import VIRTIO_MEM_REQ_UNPLUG_ALL, VIRTIO_MEM_RESP_ERROR
from memfs.virtio_mem.driver import VirtioMemDriver
from memfs.virtio_mem.sbm import SbmState
from memfs.virtio_mem.unmovable import DEFAULT_UNMOVABLE_SIZE


# -- driver: explicit operations ---------------------------------------------------

def test_plug_range_adds_partial_block_and_unplug_range_removes_it():
    m = Machine(requested=SZ_1G)
    m.drv.run()
    m.dev.set_requested_size(SZ_1G + 128 * SZ_1M)   # usable 1.375 GiB: last usable block 42
    m.requests.clear()
    addr = 0x150000000 + 5 * SB          # block 42, subblocks 5..9
    m.drv.plug_range(addr, 5 * SB)
    assert m.requests == [(PLUG, addr, 5)]
    assert m.drv.mode.get_mb_state(42) == SbmState.KERNEL_PARTIAL
    assert plugged_sb_ids(m.drv, 42) == [5, 6, 7, 8, 9]
    assert m.drv.mode.next_mb_id == 43 and m.drv.mode.get_mb_state(41) == SbmState.UNUSED
    assert [(r.start, r.end) for r in m.drv.parent_resource.children] == [
        (0x100000000, 0x13FFFFFFF), (0x150000000, 0x157FFFFFF)]
    check_invariants(m)
    m.drv.unplug_range(addr + SB, 4 * SB)
    assert plugged_sb_ids(m.drv, 42) == [5]
    m.drv.plug_range(0x150000000, 5 * SB)     # fills sb 0..4 of the partial block
    assert plugged_sb_ids(m.drv, 42) == [0, 1, 2, 3, 4, 5]
    m.drv.unplug_range(0x150000000, 6 * SB)
    assert 42 not in m.hp.blocks and m.drv.mode.get_mb_state(42) == SbmState.UNUSED
    assert m.drv.plugged_size == SZ_1G
    check_invariants(m)


def test_plug_range_across_blocks_sends_one_plug_per_block():
    m = Machine(requested=SZ_1G)
    m.drv.run()
    m.resize(SZ_1G + 4 * SB)                  # run adds block 40 with sb 0..3
    m.requests.clear()
    m.drv.unplug_range(0x100000000 + 8 * MB - 2 * SB, 4 * SB)   # last 2 of 39, first 2 of 40
    assert m.requests == [(UNPLUG, 0x140000000, 2), (UNPLUG, 0x13FC00000, 2)]
    m.requests.clear()
    m.drv.plug_range(0x100000000 + 8 * MB - 2 * SB, 4 * SB)
    assert m.requests == [(PLUG, 0x13FC00000, 2), (PLUG, 0x140000000, 2)]
    assert m.drv.mode.get_mb_state(39) == SbmState.KERNEL
    check_invariants(m)


@pytest.mark.parametrize("op, addr, size, err", [
    ("plug", 0x100000000 + SZ_1M, SB, errno.EINVAL),   # misaligned
    ("plug", 0x100000000, 3 * SZ_1M, errno.EINVAL),
    ("plug", 0x100000000, 0, errno.EINVAL),
    ("plug", 0xFFE00000, 2 * SB, errno.ERANGE),        # starts below the region
    ("plug", 0x1FFE00000, 2 * SB, errno.ERANGE),       # ends beyond it
    ("plug", 0x158000000, SB, errno.ERANGE),           # block 43: beyond usable
    ("plug", 0x13FE00000, 2 * SB, errno.EBUSY),        # half plugged already
    ("plug", 0x140000000, 130 * SZ_1M, errno.ENOSPC),  # more than requested - plugged
    ("unplug", 0x13FE00000, 2 * SB, errno.EBUSY),      # half unplugged
    ("unplug", 0x148000000, SB, errno.EBUSY),          # never plugged
])
def test_explicit_operations_validate_before_changing_anything(op, addr, size, err):
    # Blocks 32..39 plugged; then requested 1.125 GiB, not yet seen by the
    # driver: usable 1.375 GiB ends at 0x157ffffff, last usable block 42.
    m = Machine(requested=SZ_1G)
    m.drv.run()
    m.dev.set_requested_size(SZ_1G + 128 * SZ_1M)
    before = m.snapshot()
    m.requests.clear()
    with pytest.raises(HotplugError) as e:
        getattr(m.drv, f"{op}_range")(addr, size)
    assert errno_of(e) == err
    assert m.requests == [] and m.snapshot() == before


def test_explicit_operations_refuse_a_busy_device_or_occupied_block():
    m = Machine(requested=2 * SZ_1G)
    m.drv.run()
    m.resize(SZ_1G)
    m.dev.busy = True
    before = m.snapshot()
    for op in (lambda: m.drv.unplug_range(0x100000000, SB), lambda: m.drv.plug_range(0x140000000, SB),
               m.drv.unplug_all):
        with pytest.raises(HotplugError) as e:
            op()
        assert errno_of(e) == errno.EBUSY
    assert m.snapshot() == before
    m.dev.busy = False
    m.tree.request_region(0x180000000, PAGE_SIZE, "squatter", parent=m.drv.parent_resource)
    with pytest.raises(HotplugError) as e:
        m.drv.plug_range(0x180000000 + MB // 2, SB)   # block 48, usable (2.25 GiB)
    assert errno_of(e) == errno.EBUSY


def test_operations_need_a_probed_working_driver():
    m = Machine(requested=SZ_1G)
    unprobed = VirtioMemDriver(make_device(), MemoryHotplug(boot_tree((0x100000, 0x7FFDFFFF)), MB))
    ops = ("run", "plug_range", "unplug_range", "unplug_all")
    for name in ops:
        with pytest.raises(HotplugError) as e:
            call(unprobed, name)
        assert errno_of(e) == errno.ENODEV
    with pytest.raises(HotplugError) as e:
        m.drv.probe()
    assert errno_of(e) == errno.EBUSY
    m.dev.state_change_request = lambda *args: VIRTIO_MEM_RESP_ERROR   # breaks the driver
    assert m.drv.run().rc == -errno.EINVAL and m.drv.broken
    for name in ops[1:]:
        with pytest.raises(HotplugError) as e:
            call(m.drv, name)
        assert errno_of(e) == errno.EIO


def call(drv: VirtioMemDriver, name: str) -> object:
    return getattr(drv, name)(BASE, SB) if name.endswith("_range") else getattr(drv, name)()


def test_unplug_all_removes_everything_and_shrinks_the_usable_region():
    m = Machine(requested=3 * SZ_1G, unmovable_size=0)   # unmovable pages would refuse it
    m.drv.run()
    m.dev.set_requested_size(SZ_1G)     # pending, not yet seen by the driver
    m.requests.clear()
    m.drv.unplug_all()
    assert m.requests == [(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0)]
    assert m.container_lines() == ["100000000-1ffffffff : virtio0"]
    assert m.virtio_blocks() == [] and m.dev.plugged_size == 0
    assert m.dev.usable_region_size == SZ_1G + 256 * SZ_1M
    assert m.drv.run().converged
    assert m.virtio_blocks() == list(range(32, 40))
    check_invariants(m)


# -- property: random targets and user actions keep everything consistent ----------

sizes = st.one_of(st.integers(0, 2048).map(lambda n: n * SB), st.integers(0, 32).map(lambda n: n * MB))
actions = st.one_of(
    st.tuples(st.just("resize"), sizes),             # qom-set, then the work item runs
    st.tuples(st.just("qom"), sizes),                # qom-set only: room for explicit plugs
    st.tuples(st.just("toggle"), st.integers(32, 63)),
    st.tuples(st.sampled_from(["plug", "unplug"]), st.integers(0, 767), st.integers(1, 96)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(auto=st.sampled_from(["online", "offline", "online_movable"]),
       unmovable=st.sampled_from([0, DEFAULT_UNMOVABLE_SIZE]),
       steps=st.lists(actions, min_size=1, max_size=8))
def test_random_sequences_keep_invariants(auto, unmovable, steps):
    m = Machine(auto=auto, requested=0, unmovable_size=unmovable)
    m.drv.run()
    for step in steps:
        if step[0] == "resize":
            offline_before = m.drv.offline_size
            r = m.resize(step[1])
            holder = m.drv.unmovable_mb_id
            if r.rc == -errno.EBUSY:
                # Only unmovable pages stop an unplug, and only they are left.
                assert step[1] < m.hp.blocks[holder].unmovable_size == r.plugged_size
                assert f"unmovable pages in memory{holder}, ZONE_NORMAL" in r.reason
            else:
                # The usable region (requested + 256 MiB, or all of it) always
                # has room, so only the offline threshold can stop the driver...
                assert r.rc == 0 and r.plugged_size == step[1] or (
                    r.rc == -errno.ENOSPC and "offline_threshold" in r.reason)
                # ...and auto-onlined blocks do not add offline memory.
                if auto != "offline" and offline_before + MB <= SZ_1G:
                    assert (r.rc, r.plugged_size) == (0, step[1])
        elif step[0] == "qom":
            m.dev.set_requested_size(step[1])
        elif step[0] == "toggle":
            block = m.hp.blocks.get(step[1])
            if block is not None and block.unmovable_size:
                with pytest.raises(HotplugError) as e:
                    m.hp.store_state(step[1], "offline")
                assert errno_of(e) == errno.EBUSY
            elif block is not None:
                m.hp.store_state(step[1], "offline" if block.online else "online")
        else:
            addr = 0x100000000 + step[1] * SB
            try:
                getattr(m.drv, f"{step[0]}_range")(addr, step[2] * SB)
            except HotplugError:
                pass
        check_invariants(m)
