"""Unplug stops short in ZONE_NORMAL, as on real 6.1 guests: unmovable kernel memory pins a block.

The driver's unmovable_size (default 10 MiB) lands in the first device block
onlined to a kernel zone, on its first subblocks: fake-offlining (the
kernel's alloc_contig_range()) and offlining (offline_pages()) them fail with
-EBUSY. ZONE_MOVABLE never holds such memory.
"""
from __future__ import annotations

import errno

import pytest
from test_virtio_mem_harness import (
    BASE,
    MB,
    SB,
    UNPLUG,
    VIRTIO_RAM,
    Machine,
    check_invariants,
    errno_of,
    plugged_sb_ids,
)

from memfs.kernel.memory_hotplug import HotplugError, MemoryHotplug
from memfs.kernel.sizes import SZ_1G, SZ_1M
from memfs.virtio_mem.bbm import BbmState
from memfs.virtio_mem.driver import VirtioMemDriver
from memfs.virtio_mem.sbm import SbmState
from memfs.virtio_mem.unmovable import DEFAULT_UNMOVABLE_SIZE


def grow_and_shrink(m: Machine) -> None:
    """1G -> 3G -> 512M -> 514M: blocks 32..35 full, block 36 with subblock 0 (see the model tests)."""
    for size in (SZ_1G, 3 * SZ_1G, 512 * SZ_1M, 514 * SZ_1M):
        assert m.resize(size).converged


def test_zone_normal_keeps_the_first_block_with_its_unmovable_subblocks():
    # The default layout: q35 with 2 GiB boot RAM, virtio0 at 4 GiB, 4 GiB
    # region, 2 MiB blocks, auto-online "online" (ZONE_NORMAL).
    m = Machine(requested=0)
    m.drv.run()
    assert m.drv.unmovable_size == DEFAULT_UNMOVABLE_SIZE == 10 * SZ_1M
    grow_and_shrink(m)
    # Block 32 was the first onlined: its first 10 MiB = 5 subblocks are unmovable.
    assert (m.drv.unmovable_mb_id, m.hp.blocks[32].unmovable_size) == (32, 10 * SZ_1M)

    # 0: diff 514 MiB = 257 subblocks. KERNEL_PARTIAL 36 loses sb 0 and is
    # removed (256 left); KERNEL 35, 34, 33 go whole (64 left); block 32: the
    # whole-block fake-offline fails, so single subblocks from 63 down: 63..5
    # unplug (5 left), 4..0 are busy and skipped. -EBUSY: retry timer.
    r = m.resize(0)
    assert (r.rc, r.plugged_size, r.retry_ms) == (-errno.EBUSY, 10 * SZ_1M, 50_000)
    assert 10 * SZ_1M <= r.plugged_size <= 12 * SZ_1M     # what a Debian 12 guest shows
    assert "unmovable pages in memory32, ZONE_NORMAL" in r.reason
    assert m.requests == ([(UNPLUG, 0x120000000, 1)]
                          + [(UNPLUG, BASE + mb * MB, 64) for mb in (3, 2, 1)]
                          + [(UNPLUG, BASE + sb * SB, 1) for sb in range(63, 4, -1)])
    # memory32 stays added and online, in its resource.
    assert m.virtio_blocks() == [32]
    assert m.container_lines() == ["100000000-1ffffffff : virtio0", f"  100000000-107ffffff : {VIRTIO_RAM}"]
    assert m.hp.blocks[32].show("state") == "online\n"
    assert m.drv.mode.get_mb_state(32) == SbmState.KERNEL_PARTIAL
    assert plugged_sb_ids(m.drv, 32) == [0, 1, 2, 3, 4]
    check_invariants(m)

    # The driver keeps retrying: nothing moves, the timer doubles.
    m.requests.clear()
    r = m.drv.run()
    assert (r.rc, r.plugged_size, r.retry_ms, m.requests) == (-errno.EBUSY, 10 * SZ_1M, 100_000, [])


def test_zone_movable_empties_completely():
    m = Machine(auto="online_movable", requested=0)
    m.drv.run()
    grow_and_shrink(m)
    assert m.resize(0).converged
    assert m.virtio_blocks() == [] and m.container_lines() == ["100000000-1ffffffff : virtio0"]
    assert m.drv.unmovable_mb_id is None
    check_invariants(m)


def test_unmovable_size_is_rounded_up_to_subblocks():
    m = Machine(requested=SZ_1G, unmovable_size=11 * SZ_1M)
    m.drv.run()
    assert m.hp.blocks[32].unmovable_size == 12 * SZ_1M
    r = m.resize(0)
    assert (r.rc, r.plugged_size, plugged_sb_ids(m.drv, 32)) == (-errno.EBUSY, 12 * SZ_1M, list(range(6)))


def test_busy_subblocks_are_skipped_and_unplug_goes_on_with_other_blocks():
    m = Machine(requested=SZ_1G)
    m.drv.run()
    m.drv.unplug_range(BASE + 63 * SB, SB)          # memory32 is KERNEL_PARTIAL: visited before KERNEL
    # 512 MiB: diff 510 MiB = 255 subblocks. Block 32 gives sb 62..5 (58) and
    # skips 4..0; KERNEL 39, 38, 37 go whole (192), block 36 sb 63..59 (5).
    m.requests.clear()
    assert m.resize(512 * SZ_1M).converged
    assert m.requests == ([(UNPLUG, BASE + sb * SB, 1) for sb in range(62, 4, -1)]
                          + [(UNPLUG, BASE + mb * MB, 64) for mb in (7, 6, 5)]
                          + [(UNPLUG, BASE + 4 * MB + sb * SB, 1) for sb in range(63, 58, -1)])
    check_invariants(m)


@pytest.mark.parametrize("first_plug, expected", [
    ((BASE + MB, 2 * SB), (33, 2 * SB)),           # block 33, subblocks 0-1: only those hold them
    ((BASE + MB + SB, SB), (None, 0)),             # block 33, subblock 1: nothing plugged at its start
])
def test_unmovable_memory_lands_only_on_plugged_subblocks_from_the_start(first_plug, expected):
    m = Machine(requested=0)
    m.drv.run()
    m.dev.set_requested_size(SZ_1G)                # not yet seen by the driver: room for explicit plugs
    m.drv.plug_range(*first_plug)                  # added and onlined (auto-online) first
    assert (m.drv.unmovable_mb_id, m.hp.blocks[33].unmovable_size) == expected
    m.drv.plug_range(BASE, MB)                     # block 32 comes second
    assert m.hp.blocks[32].unmovable_size == (0 if expected[0] else 10 * SZ_1M)
    check_invariants(m)


def test_the_first_block_onlined_to_a_kernel_zone_takes_them():
    m = Machine(auto="offline", requested=3 * MB)
    m.drv.run()                                     # blocks 32..34, offline
    m.hp.store_state(32, "online_movable")          # ZONE_MOVABLE never holds any
    m.hp.store_state(34, "online")
    m.hp.store_state(33, "online_kernel")           # 34 holds them already
    assert [m.hp.blocks[i].unmovable_size for i in (32, 33, 34)] == [0, 0, 10 * SZ_1M]
    assert m.drv.unmovable_mb_id == 34
    check_invariants(m)


def test_no_unmovable_memory_without_unmovable_size():
    m = Machine(requested=SZ_1G, unmovable_size=0)
    m.drv.run()
    assert m.resize(0).converged and m.virtio_blocks() == []


def test_unmovable_size_must_not_be_negative():
    m = Machine(requested=0)
    with pytest.raises(ValueError):
        VirtioMemDriver(m.dev, MemoryHotplug(m.tree, MB), unmovable_size=-1)


def test_offlining_the_holder_is_ebusy_and_changes_nothing():
    m = Machine(requested=SZ_1G)
    m.drv.run()
    before = m.snapshot()
    for store in (lambda: m.hp.store_state(32, "offline"), lambda: m.hp.store_online(32, "0")):
        with pytest.raises(HotplugError) as e:
            store()
        assert errno_of(e) == errno.EBUSY and "unmovable pages in memory32, ZONE_NORMAL" in str(e.value)
    assert m.snapshot() == before
    m.hp.store_state(33, "offline")                  # the others are free to go
    assert m.drv.mode.get_mb_state(33) == SbmState.OFFLINE


def test_explicit_unplug_of_unmovable_subblocks_is_refused():
    m = Machine(requested=SZ_1G)
    m.drv.run()
    before = m.snapshot()
    # Subblock 4; 3..6; block 32 from 4 on plus block 33's first subblocks (unplugged first, if at all).
    for addr, size in ((BASE + 4 * SB, SB), (BASE + 3 * SB, 4 * SB), (BASE + 4 * SB, MB)):
        with pytest.raises(HotplugError) as e:
            m.drv.unplug_range(addr, size)
        assert errno_of(e) == errno.EBUSY and "unmovable pages in memory32" in str(e.value)
    assert m.snapshot() == before
    m.drv.unplug_range(BASE + 5 * SB, SB)            # the first free subblock goes
    assert plugged_sb_ids(m.drv, 32) == [0, 1, 2, 3, 4] + list(range(6, 64))


def test_unplug_all_is_refused_while_unmovable_memory_pins_a_block():
    m = Machine(requested=SZ_1G)
    m.drv.run()
    before = m.snapshot()
    m.requests.clear()
    with pytest.raises(HotplugError) as e:
        m.drv.unplug_all()
    assert errno_of(e) == errno.EBUSY and "unmovable pages in memory32" in str(e.value)
    assert m.requests == [] and m.snapshot() == before


def test_bbm_skips_a_busy_big_block_and_goes_on():
    m = Machine(block=SZ_1G, auto="offline", requested=2 * SZ_1G)
    m.drv.run()                                     # big blocks 4 and 5, offline
    for mb_id in [*range(40, 48), *range(32, 40)]:  # memory40 is onlined first: it holds them
        m.hp.store_state(mb_id, "online")
    # Pass 2 visits 5 first: busy, skipped; 4 goes.
    r = m.resize(0)
    assert (r.rc, r.plugged_size, m.requests) == (-errno.EBUSY, SZ_1G, [(UNPLUG, 0x100000000, 1)])
    assert "unmovable pages in memory40, ZONE_NORMAL" in r.reason
    assert [m.drv.mode.get_bb_state(i) for i in (4, 5)] == [BbmState.UNUSED, BbmState.ADDED]


def test_bbm_keeps_the_big_block_holding_unmovable_memory():
    # 1 GiB device blocks: big blocks 4 (memory32..39) and 5 (memory40..47).
    m = Machine(block=SZ_1G, requested=2 * SZ_1G)
    m.drv.run()
    assert (m.drv.unmovable_mb_id, m.hp.blocks[32].unmovable_size) == (32, 10 * SZ_1M)   # pages, not subblocks
    # Pass 0 and 1 find nothing (online, ZONE_NORMAL); pass 2 takes 5, then
    # fails to fake-offline 4 (-EBUSY, skipped).
    r = m.resize(0)
    assert (r.rc, r.plugged_size, r.retry_ms) == (-errno.EBUSY, SZ_1G, 50_000)
    # Safe unplug: fake-offlining fails before offlining is tried.
    assert r.reason == "unmovable pages in memory32, ZONE_NORMAL: cannot fake-offline 0x100000000+0x40000000"
    assert m.requests == [(UNPLUG, 0x140000000, 1)]
    assert [m.drv.mode.get_bb_state(i) for i in (4, 5)] == [BbmState.ADDED, BbmState.UNUSED]
    assert m.virtio_blocks() == list(range(32, 40))
