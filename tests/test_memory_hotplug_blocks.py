"""Memory blocks as ranges: the cost grows with resources and changed blocks, not the address space."""
from __future__ import annotations

import errno
import itertools
import tracemalloc

import pytest
from test_memory_hotplug import NAME, RAM_BUSY, default_tree, errno_of, tree_with, with_container

from memfs.kernel.memory_hotplug import MemoryHotplug, max_pfn_end, memory_block_size_bytes
from memfs.kernel.sizes import SZ_1G, SZ_1M

MB = 128 * SZ_1M


def test_full_64_bit_system_ram_costs_next_to_nothing():
    # `00000000-ffffffffffffffff : System RAM`: 2^33 blocks of 2 GiB.
    tree = tree_with((0, (1 << 64) - 1, "System RAM", RAM_BUSY))
    tracemalloc.start()
    try:
        hp = MemoryHotplug(tree, memory_block_size_bytes(max_pfn_end(tree)))
        n = len(hp.blocks)
        zones = [hp.blocks[mb_id].show("valid_zones") for mb_id in (0, 1, 2, n - 1)]
        tail = list(itertools.islice(hp.blocks.ids_from(n - 2), 5))
        hp.store_state(n - 1, "offline")
        offline = hp.blocks[n - 1].show("state")
        hp.store_state(n - 1, "online")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    # max_pfn and the block size stay right: the end is a multiple of 2 GiB.
    assert (hp.block_size, n, hp.high_memory_end) == (2 * SZ_1G, 1 << 33, (1 << 64) - 1)
    # memory0 spans DMA and DMA32, memory1 is DMA32 (2-4 GiB), the rest Normal.
    assert zones == ["none\n", "DMA32\n", "Normal\n", "Normal\n"]
    assert tail == [n - 2, n - 1] and n not in hp.blocks and -1 not in hp.blocks
    assert offline == "offline\n" and hp.blocks[n - 1].show("state") == "online\n"


def test_a_2_52_address_space_lists_boot_and_hot_added_blocks_in_order():
    end = 1 << 52
    tree = tree_with((0x100000, end - 1, "System RAM", RAM_BUSY))
    with_container(tree, end, 4 * SZ_1G)
    hp = MemoryHotplug(tree, memory_block_size_bytes(max_pfn_end(tree)))
    last_boot = (end - 1) // hp.block_size
    hp.add_memory_driver_managed(end + hp.block_size, hp.block_size, NAME, object())
    assert list(hp.blocks.ids_from(last_boot - 1)) == [last_boot - 1, last_boot, last_boot + 2]
    assert len(hp.blocks) == last_boot + 2
    assert not hp.blocks[last_boot + 2].boot and hp.blocks[last_boot].boot
    assert hp.high_memory_end == end + 2 * hp.block_size - 1


def test_boot_blocks_are_stored_only_while_they_differ_from_boot():
    hp = MemoryHotplug(default_tree(), MB)
    assert hp.blocks[5] is not hp.blocks[5]            # built on each lookup
    hp.store_state(5, "offline")
    assert hp.blocks[5] is hp.blocks[5] and hp.blocks[5].state == "offline"
    hp.store_state(5, "online")                        # back to its boot default
    assert hp.blocks[5] is not hp.blocks[5]
    assert (hp.blocks[5].state, hp.blocks[5].zone) == ("online", "DMA32")


def test_unmovable_memory_keeps_a_boot_block_stored():
    hp = MemoryHotplug(default_tree(), MB)
    hp.alloc_unmovable(5, SZ_1M)
    assert hp.blocks[5].unmovable_size == SZ_1M
    with pytest.raises(OSError) as e:
        hp.store_state(5, "offline")
    assert errno_of(e) == errno.EBUSY


def test_removed_boot_blocks_are_gone_and_can_come_back_hot_added():
    tree = default_tree()
    hp = MemoryHotplug(tree, MB)
    hp.add_memory_driver_managed(0x100000000, 2 * MB, NAME, object())
    hp.offline_and_remove_memory(3 * MB, MB)           # boot memory goes too
    assert 3 not in hp.blocks and len(hp.blocks) == 17
    assert list(hp.blocks) == [0, 1, 2] + list(range(4, 16)) + [32, 33]
    assert list(hp.blocks.ids_from(3)) == list(range(4, 16)) + [32, 33]
    with pytest.raises(KeyError):
        hp.blocks[3]
    with pytest.raises(OSError) as e:
        hp.block(3)
    assert errno_of(e) == errno.ENOENT
    hp.add_memory_driver_managed(3 * MB, MB, "System RAM (kmem)", object())
    assert list(hp.blocks)[:5] == [0, 1, 2, 3, 4] and len(hp.blocks) == 18
    assert not hp.blocks[3].boot and hp.blocks[3].online


def test_bounded_walks_agree_with_the_whole_listing_short_and_long():
    """ids_from(start, last) probes short ranges id by id and walks long ones by runs: both
    must list exactly the existing ids of the range, around removed boot and hot-added blocks."""
    tree = default_tree()
    hp = MemoryHotplug(tree, MB)
    hp.add_memory_driver_managed(0x100000000, 2 * MB, NAME, object())
    hp.offline_and_remove_memory(3 * MB, MB)
    hp.offline_and_remove_memory(9 * MB, MB)
    every = list(hp.blocks)
    assert every == [0, 1, 2, 4, 5, 6, 7, 8] + list(range(10, 16)) + [32, 33]
    for start in range(0, 40, 3):
        for last in (start, start + 1, start + 7, start + 15, start + 16, start + 30, start + 100):
            want = [i for i in every if start <= i <= last]
            assert list(hp.blocks.ids_from(start, last)) == want, (start, last)
            assert [b.id for b in hp.blocks_in(start * MB, (last - start + 1) * MB)] == want
