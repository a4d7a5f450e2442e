"""The virtio-mem driver (Linux 6.1 drivers/virtio/virtio_mem.c, spec 6.2-6.10): probe and its work item."""
from __future__ import annotations

import errno

import pytest
from test_virtio_mem_harness import (
    BASE,
    MB,
    PLUG,
    SB,
    UNPLUG,
    VIRTIO_RAM,
    Machine,
    boot_tree,
    check_invariants,
    errno_of,
    make_device,
    plugged_sb_ids,
)

from memfs.kernel.ioport import IORESOURCE_SYSTEM_RAM
from memfs.kernel.memory_hotplug import HotplugError, MemoryHotplug
from memfs.kernel.sizes import SZ_1G, SZ_1M
from memfs.virtio_mem.bbm import BbmState
from memfs.virtio_mem.device import VIRTIO_MEM_RESP_ERROR
from memfs.virtio_mem.driver import VirtioMemDriver
from memfs.virtio_mem.sbm import Sbm, SbmState


# -- driver: probe -----------------------------------------------------------------

def test_probe_creates_container_and_selects_sbm():
    m = Machine(requested=0)
    assert m.container_lines() == ["100000000-1ffffffff : virtio0"]
    assert m.drv.parent_resource.flags == 0x09000200
    assert (isinstance(m.drv.mode, Sbm), m.drv.mode.sb_size, m.drv.mode.sbs_per_mb, m.drv.mode.first_mb_id) == (
        True, SB, 64, 32)
    assert m.drv.offline_threshold == SZ_1G
    assert m.drv.work_pending and m.drv.config_changed
    assert not m.drv.unplug_all_required


@pytest.mark.parametrize("block, bb_size, threshold", [(128 * SZ_1M, 128 * SZ_1M, SZ_1G), (SZ_1G, SZ_1G, 2 * SZ_1G)])
def test_probe_selects_bbm_for_big_device_blocks(block, bb_size, threshold):
    m = Machine(block=block, requested=0)
    assert (isinstance(m.drv.mode, Sbm), m.drv.mode.bb_size, m.drv.offline_threshold) == (False, bb_size, threshold)
    assert m.drv.mode.first_bb_id == 0x100000000 // bb_size


def test_probe_fails_over_busy_memory():
    tree = boot_tree((0x100000, 0x7FFDFFFF))
    tree.request_region(0x180000000, MB, "System RAM (kmem)", IORESOURCE_SYSTEM_RAM)
    hp = MemoryHotplug(tree, MB)
    drv = VirtioMemDriver(make_device(), hp)
    before = [(r.start, r.end, r.flags) for r, _ in tree.walk()]
    with pytest.raises(HotplugError) as e:
        drv.probe()
    assert errno_of(e) == errno.EBUSY
    assert "could not reserve device region" in str(e.value)
    assert [(r.start, r.end, r.flags) for r, _ in tree.walk()] == before


def test_leftover_plugged_memory_is_unplugged_all_first():
    tree = boot_tree((0x100000, 0x7FFDFFFF))
    hp = MemoryHotplug(tree, MB)
    dev = make_device(requested=SZ_1G)
    dev.handle_request(PLUG, BASE + SZ_1G, 4)      # a previous guest's leftovers
    drv = VirtioMemDriver(dev, hp)
    drv.probe()
    assert drv.unplug_all_required
    assert drv.run().converged
    # UNPLUG_ALL freed the leftover; the driver then plugged from the bottom.
    assert drv.plugged_ranges() == [(BASE, BASE + SZ_1G)]
    assert not drv.unplug_all_required


# -- driver: spec 6.10 worked example -----------------------------------------------

def test_spec_6_10_worked_example():
    # The spec derives it from the driver alone: no unmovable kernel memory.
    m = Machine(ram=((0x100000, 0x7FFFFFFF), (0x100000000, 0x13FFFFFFF)),
                addr=0x140000000, region=8 * SZ_1G, requested=0, unmovable_size=0)
    assert m.drv.run().converged
    assert m.container_lines() == ["140000000-33fffffff : virtio0"]
    assert max(m.hp.blocks) == 39 and m.virtio_blocks() == []   # no memory40+ yet
    assert m.drv.mode.first_mb_id == 40

    # Step 1: 256 MiB. Two new blocks, each one PLUG of 64 device blocks.
    assert m.resize(256 * SZ_1M).converged
    assert m.requests == [(PLUG, 0x140000000, 64), (PLUG, 0x148000000, 64)]
    assert m.container_lines() == ["140000000-33fffffff : virtio0",
                                   "  140000000-14fffffff : System RAM (virtio_mem)"]
    assert m.virtio_blocks() == [40, 41]
    assert [m.hp.blocks[i].show("phys_index") for i in (40, 41)] == ["00000028\n", "00000029\n"]
    assert m.hp.blocks[41].show("state") == "online\n"

    # Step 2: 200 MiB. 28 single-subblock unplugs from block 41, sb 63 down to 36.
    assert m.resize(200 * SZ_1M).converged
    assert m.requests == [(UNPLUG, 0x148000000 + sb * SB, 1) for sb in range(63, 35, -1)]
    assert m.container_lines()[1] == "  140000000-14fffffff : System RAM (virtio_mem)"
    assert m.drv.mode.get_mb_state(41) == SbmState.KERNEL_PARTIAL
    assert m.hp.blocks[41].state == "online"

    # Step 3: 100 MiB. KERNEL_PARTIAL block 41 first (sb 35..0, then removed),
    # then KERNEL block 40 loses sb 63..50.
    assert m.resize(100 * SZ_1M).converged
    assert m.requests == ([(UNPLUG, 0x148000000 + sb * SB, 1) for sb in range(35, -1, -1)]
                          + [(UNPLUG, 0x140000000 + sb * SB, 1) for sb in range(63, 49, -1)])
    assert m.container_lines() == ["140000000-33fffffff : virtio0",
                                   "  140000000-147ffffff : System RAM (virtio_mem)"]
    assert 41 not in m.hp.blocks and m.drv.mode.get_mb_state(41) == SbmState.UNUSED
    assert m.drv.mode.get_mb_state(40) == SbmState.KERNEL_PARTIAL
    assert m.dev.plugged_size == 100 * SZ_1M

    # Step 4: 0. Block 40's remaining 50 subblocks, then the block goes away.
    assert m.resize(0).converged
    assert m.requests == [(UNPLUG, 0x140000000 + sb * SB, 1) for sb in range(49, -1, -1)]
    assert m.container_lines() == ["140000000-33fffffff : virtio0"]
    assert m.virtio_blocks() == []
    assert m.hp.high_memory_end == 0x14FFFFFFF      # max_pfn never goes down
    check_invariants(m)


# -- driver: the project's default machine ------------------------------------------

def test_default_machine_sequence():
    # Boot RAM 0x100000-0x7ffdffff, virtio-mem at 4 GiB, region 4 GiB, 2 MiB
    # blocks, requested 1 GiB. first_mb_id = 0x100000000 / 128 MiB = 32.
    m = Machine(requested=SZ_1G)
    r = m.drv.run()
    assert (r.rc, r.plugged_size, r.requested_size) == (0, SZ_1G, SZ_1G)
    # 1 GiB = 512 subblocks = 8 whole blocks 32..39, each one PLUG of 64.
    assert m.requests == [(PLUG, 0x100000000 + i * MB, 64) for i in range(8)]
    c = m.drv.parent_resource
    assert (c.start, c.end, c.name, c.flags) == (0x100000000, 0x1FFFFFFFF, "virtio0", 0x09000200)
    assert [(r.start, r.end, r.name, r.flags) for r in c.children] == [
        (0x100000000, 0x13FFFFFFF, VIRTIO_RAM, 0x87000200)]
    assert m.virtio_blocks() == list(range(32, 40))
    assert all(m.hp.blocks[i].state == "online" for i in range(32, 40))
    assert m.dev.plugged_size == SZ_1G

    # 3 GiB: usable = min(4G, 3G + 256M) = 3.25 GiB -> last usable block
    # (0x100000000 + 0xd0000000 - 1) // 128 MiB = 57. diff 2 GiB = 1024
    # subblocks: no partial or UNUSED blocks, so 16 new blocks 40..55. With
    # auto-online every block is onlined at once, offline_size stays 0 and
    # the offline_threshold never stops it.
    assert m.resize(3 * SZ_1G).converged
    assert m.dev.usable_region_size == 3 * SZ_1G + 256 * SZ_1M
    assert m.drv.mode.last_usable_mb_id == 57
    assert m.requests == [(PLUG, 0x100000000 + i * MB, 64) for i in range(8, 24)]
    assert [(r.start, r.end) for r in c.children] == [(0x100000000, 0x1BFFFFFFF)]
    assert m.virtio_blocks() == list(range(32, 56))

    # 512 MiB: diff 2.5 GiB = 1280 subblocks. Only KERNEL (full, online)
    # blocks exist: descending from 55, each fully plugged with >= 64 to go,
    # so one UNPLUG of 64 and offline_and_remove per block: 55..36 (20 blocks).
    assert m.resize(512 * SZ_1M).converged
    assert m.requests == [(UNPLUG, 0x100000000 + i * MB, 64) for i in range(23, 3, -1)]
    assert [(r.start, r.end) for r in c.children] == [(0x100000000, 0x11FFFFFFF)]
    assert m.virtio_blocks() == [32, 33, 34, 35]
    assert m.dev.usable_region_size == 3 * SZ_1G + 256 * SZ_1M   # QEMU never shrinks it here

    # 514 MiB: diff 2 MiB = 1 subblock. No partial blocks; the lowest UNUSED
    # block is 36, so plug its subblock 0 (one PLUG of 1) and add all of it.
    assert m.resize(514 * SZ_1M).converged
    assert m.requests == [(PLUG, 0x120000000, 1)]
    assert [(r.start, r.end) for r in c.children] == [(0x100000000, 0x127FFFFFF)]
    assert m.virtio_blocks() == [32, 33, 34, 35, 36]
    assert m.drv.mode.get_mb_state(36) == SbmState.KERNEL_PARTIAL
    assert plugged_sb_ids(m.drv, 36) == [0]
    check_invariants(m)


def test_offline_threshold_and_requeue_after_onlining():
    # Blocks stay offline: at most offline_threshold = 1 GiB = 8 blocks.
    m = Machine(auto="offline", requested=2 * SZ_1G)
    r = m.drv.run()
    assert (r.rc, r.plugged_size, r.retry_ms) == (-errno.ENOSPC, SZ_1G, None)
    assert "offline_threshold" in r.reason
    assert m.virtio_blocks() == list(range(32, 40))
    assert m.drv.offline_size == SZ_1G and not m.drv.work_pending
    # The work is queued again once half the threshold could be added.
    for mb_id in (32, 33, 34):
        m.hp.store_state(mb_id, "online")
    assert m.drv.offline_size == 5 * MB and not m.drv.work_pending
    m.hp.store_state(35, "online")
    assert m.drv.work_pending
    r = m.drv.run()
    assert (r.rc, r.plugged_size) == (-errno.ENOSPC, SZ_1G + 4 * MB)
    assert m.virtio_blocks() == list(range(32, 44))
    check_invariants(m)


def test_unplug_prefers_offline_blocks_and_removes_them_without_offlining():
    m = Machine(auto="offline", requested=512 * SZ_1M)
    m.drv.run()
    m.hp.store_state(32, "online")
    m.hp.store_state(33, "online_movable")
    # 256 MiB = 128 subblocks: OFFLINE class first (35, 34), one UNPLUG per
    # block because the raw offline path merges adjacent plugged subblocks.
    r = m.resize(256 * SZ_1M)
    assert r.converged
    assert m.requests == [(UNPLUG, 0x118000000, 64), (UNPLUG, 0x110000000, 64)]
    assert m.virtio_blocks() == [32, 33]
    assert (m.drv.mode.get_mb_state(32), m.drv.mode.get_mb_state(33)) == (SbmState.KERNEL, SbmState.MOVABLE)
    # Next: MOVABLE before KERNEL for whole blocks.
    m.resize(128 * SZ_1M)
    assert m.requests == [(UNPLUG, 0x108000000, 64)]
    assert m.virtio_blocks() == [32]
    check_invariants(m)


def test_unplug_online_false_leaves_online_memory_alone():
    m = Machine(requested=512 * SZ_1M)
    m.drv.unplug_online = False
    m.drv.run()
    r = m.resize(256 * SZ_1M)
    assert (r.rc, r.plugged_size, m.requests) == (0, 512 * SZ_1M, [])
    assert "unplug_online" in r.reason


def test_driver_vetoes_onlining_blocks_it_does_not_manage():
    m = Machine(auto="offline", requested=256 * SZ_1M)
    m.drv.run()
    # Someone else adds memory inside virtio0: the driver has it as UNUSED.
    m.hp.add_memory_driver_managed(0x1F8000000, MB, "System RAM (kmem)", object())
    with pytest.raises(HotplugError) as e:
        m.hp.store_state(0x1F8000000 // MB, "online")
    assert errno_of(e) == errno.EPERM
    m.hp.store_state(32, "online")   # its own offline block is fine
    assert m.drv.mode.get_mb_state(32) == SbmState.KERNEL


def test_busy_device_arms_a_doubling_retry_timer():
    m = Machine(requested=0)
    m.drv.run()
    m.dev.busy = True
    r1 = m.resize(SZ_1G)
    r2 = m.drv.run()
    assert (r1.rc, r1.retry_ms, r2.retry_ms) == (-errno.ETXTBSY, 50_000, 100_000)
    assert "BUSY" in r1.reason and r1.plugged_size == 0
    m.dev.busy = False
    assert m.drv.run().converged
    assert m.drv.retry_timer_ms == 50_000
    check_invariants(m)


def test_device_error_marks_driver_broken():
    m = Machine(requested=0)
    m.drv.run()
    m.dev.state_change_request = lambda *args: VIRTIO_MEM_RESP_ERROR   # a confused host
    r = m.resize(SZ_1G)
    assert (r.rc, m.drv.broken) == (-errno.EINVAL, True)
    assert "ERROR" in r.reason and "broken" in r.reason
    m.requests.clear()
    assert m.drv.run() is r and m.requests == []


def test_config_change_during_run_restarts_it():
    m = Machine(requested=0)
    m.drv.run()

    def host_lowers_target(action, block):
        if m.dev.requested_size == SZ_1G:
            m.dev.set_requested_size(256 * SZ_1M)
    # Onlining the first added block makes the host lower the target while plugging.
    m.hp.register_memory_notifier(host_lowers_target)
    r = m.resize(SZ_1G)
    # Block 32 got plugged; the next PLUG saw config_changed (-EAGAIN); the
    # rerun re-read 256 MiB and plugged block 33 only.
    assert (r.rc, r.plugged_size, r.requested_size) == (0, 256 * SZ_1M, 256 * SZ_1M)
    assert m.requests == [(PLUG, 0x100000000, 64), (PLUG, 0x108000000, 64)]


# -- driver: BBM ------------------------------------------------------------------

def test_bbm_plugs_and_unplugs_whole_big_blocks():
    # 1 GiB device blocks: BBM, big blocks 4, 5, 6 (1 GiB each, from 4 GiB).
    # Without unmovable pages, which would pin memory32 (offlined below).
    m = Machine(block=SZ_1G, requested=3 * SZ_1G, unmovable_size=0)
    assert m.drv.run().converged
    assert m.requests == [(PLUG, 0x100000000, 1), (PLUG, 0x140000000, 1), (PLUG, 0x180000000, 1)]
    assert m.virtio_blocks() == list(range(32, 56))
    assert [(r.start, r.end) for r in m.drv.parent_resource.children] == [(0x100000000, 0x1BFFFFFFF)]
    for mb_id in range(40, 48):                      # big block 5 entirely offline
        m.hp.store_state(mb_id, "offline")
    for mb_id in range(32, 40):                      # big block 4 entirely Movable
        m.hp.store_state(mb_id, "offline")
        m.hp.store_state(mb_id, "online_movable")
    # Pass 0 takes only completely offline big blocks: 5, not the higher 6.
    assert m.resize(2 * SZ_1G).converged
    assert m.requests == [(UNPLUG, 0x140000000, 1)]
    # Pass 0 finds none, pass 1 (all online memory Movable) takes 4 before 6.
    assert m.resize(SZ_1G).converged
    assert m.requests == [(UNPLUG, 0x100000000, 1)]
    assert [m.drv.mode.get_bb_state(i) for i in (4, 5, 6)] == [BbmState.UNUSED, BbmState.UNUSED, BbmState.ADDED]
    assert m.virtio_blocks() == list(range(48, 56))
    assert m.drv.plugged_ranges() == [(0x180000000, 0x1C0000000)]
    assert m.drv.offline_size == 0


def test_force_bbm_with_small_device_blocks():
    # bb_size = max(2 MiB, 128 MiB): one PLUG of 64 device blocks per big block.
    m = Machine(requested=256 * SZ_1M, force_bbm=True)
    assert m.drv.run().converged
    assert (isinstance(m.drv.mode, Sbm), m.drv.mode.bb_size) == (False, MB)
    assert m.requests == [(PLUG, 0x100000000, 64), (PLUG, 0x108000000, 64)]
    assert [m.drv.mode.get_bb_state(i) for i in (32, 33, 34)] == [BbmState.ADDED, BbmState.ADDED, BbmState.UNUSED]
