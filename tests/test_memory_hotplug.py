"""Memory blocks and memory hotplug (spec 2.8, 2.9, 6.1)."""
from __future__ import annotations

import errno

import pytest

from memfs.changes import MemoryChanged
from memfs.kernel.ioport import (
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_MEM,
    IORESOURCE_SYSTEM_RAM,
    Resource,
)
from memfs.kernel.memory_hotplug import (
    MEM_GOING_OFFLINE,
    MEM_GOING_ONLINE,
    MEM_OFFLINE,
    MEM_ONLINE,
    HotplugError,
    MemoryHotplug,
    kstrtobool,
    memory_block_size_bytes,
)
from memfs.kernel.resource import ResourceTree
from memfs.kernel.sizes import PAGE_SIZE, SZ_1G, SZ_1M

MB = 128 * SZ_1M
RAM_BUSY = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
NAME = "System RAM (virtio_mem)"


def tree_with(*ranges: tuple[int, int, str, int]) -> ResourceTree:
    tree = ResourceTree()
    for start, end, name, flags in ranges:
        tree.request_resource(Resource(start, end, name, flags))
    return tree


def default_tree() -> ResourceTree:
    """The project's default machine: 2 GiB below 4 GiB minus the usual holes."""
    return tree_with((0x100000, 0x7FFDFFFF, "System RAM", RAM_BUSY))


def with_container(tree: ResourceTree, start: int, size: int, name: str = "virtio0") -> Resource:
    """What virtio-mem's probe leaves behind: a non-busy MEM|SYSRAM|EXCLUSIVE parent."""
    res = tree.request_region(start, size, name, IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE)
    res.flags &= ~IORESOURCE_BUSY
    return res


def lines(tree: ResourceTree) -> list[str]:
    return [f"{'  ' * d}{r.start:08x}-{r.end:08x} : {r.name}" for r, d in tree.walk()]


def deny_onlining(action, block) -> None:
    if action == MEM_GOING_ONLINE:
        raise HotplugError(errno.EPERM, "denied")


def errno_of(exc_info) -> int:
    return exc_info.value.errno


# -- memory_block_size_bytes (spec 6.1, x86-64 probe_memory_block_size) ----

@pytest.mark.parametrize("boot_end, bare_metal, expected", [
    (2 * SZ_1G, False, 128 * SZ_1M),                 # below 64 GiB: always the minimum
    (64 * SZ_1G - PAGE_SIZE, True, 128 * SZ_1M),
    (64 * SZ_1G, True, 2 * SZ_1G),                   # bare metal: the maximum
    (64 * SZ_1G + 128 * SZ_1M, True, 2 * SZ_1G),
    (64 * SZ_1G, False, 2 * SZ_1G),                  # VM: largest power of two dividing the end
    (64 * SZ_1G + 1 * SZ_1G, False, 1 * SZ_1G),
    (64 * SZ_1G + 512 * SZ_1M, False, 512 * SZ_1M),
    (64 * SZ_1G + 768 * SZ_1M, False, 256 * SZ_1M),  # 768 MiB = 3 * 256 MiB
    (64 * SZ_1G + 384 * SZ_1M, False, 128 * SZ_1M),
    (64 * SZ_1G + PAGE_SIZE, False, 128 * SZ_1M),    # nothing divides it: the minimum
])
def test_memory_block_size(boot_end, bare_metal, expected):
    assert memory_block_size_bytes(boot_end, bare_metal) == expected


# -- boot memory blocks ----------------------------------------------------

def test_boot_blocks_of_the_default_machine():
    hp = MemoryHotplug(default_tree(), MB)
    # 0x7ffdffff // 128 MiB = 15: blocks 0..15, nothing else.
    assert sorted(hp.blocks) == list(range(16))
    assert hp.high_memory_end == 0x7FFDFFFF
    assert hp.block_size_bytes_show() == "8000000\n"
    b0, b1, b15 = hp.blocks[0], hp.blocks[1], hp.blocks[15]
    # memory0 holds RAM in ZONE_DMA (<16 MiB) and ZONE_DMA32: spans zones.
    assert b0.show("valid_zones") == "none\n"
    assert b1.show("valid_zones") == "DMA32\n"
    assert b15.show("valid_zones") == "DMA32\n"
    assert b15.show("phys_index") == "0000000f\n"
    assert [b1.show(a) for a in ("state", "online", "removable", "phys_device")] == \
        ["online\n", "1\n", "1\n", "0\n"]
    assert all(b.boot for b in hp.blocks.values())


def test_holes_have_no_blocks_and_only_busy_top_level_ram_counts():
    tree = tree_with((0x100000, 0x7FFFFFFF, "System RAM", RAM_BUSY),
                     (0xFEC00000, 0xFEC003FF, "IOAPIC 0", IORESOURCE_MEM | IORESOURCE_BUSY),
                     (0x100000000, 0x13FFFFFFF, "System RAM", RAM_BUSY),
                     (0x200000000, 0x207FFFFFF, "System RAM", IORESOURCE_SYSTEM_RAM))   # not busy
    hp = MemoryHotplug(tree, MB)
    # 3-4 GiB hole (blocks 16..31) and the non-busy range (block 64) have no block.
    assert sorted(hp.blocks) == list(range(16)) + list(range(32, 40))
    assert hp.blocks[32].show("phys_index") == "00000020\n"
    assert hp.blocks[32].show("valid_zones") == "Normal\n"
    assert hp.high_memory_end == 0x13FFFFFFF


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        MemoryHotplug(default_tree(), 96 * SZ_1M)


# -- add_memory_driver_managed -------------------------------------------------

def test_add_nests_in_container_merges_and_onlines():
    tree = default_tree()
    container = with_container(tree, 0x100000000, 4 * SZ_1G)
    hp = MemoryHotplug(tree, MB)
    token = object()
    hp.add_memory_driver_managed(0x100000000, MB, NAME, token)
    hp.add_memory_driver_managed(0x108000000, MB, NAME, token)
    [ram] = container.children
    # MEM|SYSRAM inherited, DRIVER_MANAGED|BUSY requested, MERGEABLE from merging.
    assert (ram.start, ram.end, ram.name, ram.flags) == (0x100000000, 0x10FFFFFFF, NAME, 0x87000200)
    assert hp.blocks[32].state == hp.blocks[33].state == "online"
    assert hp.blocks[33].show("valid_zones") == "Normal\n"
    assert not hp.blocks[32].boot
    assert hp.high_memory_end == 0x10FFFFFFF


def test_different_name_tokens_never_merge():
    tree = default_tree()
    container = with_container(tree, 0x100000000, 4 * SZ_1G)
    hp = MemoryHotplug(tree, MB)
    hp.add_memory_driver_managed(0x100000000, MB, NAME, object())
    hp.add_memory_driver_managed(0x108000000, MB, NAME, object())
    assert [(r.start, r.end) for r in container.children] == [(0x100000000, 0x107FFFFFF),
                                                              (0x108000000, 0x10FFFFFFF)]


def test_add_without_merge_keeps_flags_unmergeable():
    tree = default_tree()
    with_container(tree, 0x100000000, 4 * SZ_1G)
    hp = MemoryHotplug(tree, MB)
    hp.add_memory_driver_managed(0x100000000, MB, NAME, object(), merge=False)
    assert hp.tree.root.children[1].children[0].flags == 0x83000200


@pytest.mark.parametrize("word, state, zone_text", [
    ("online", "online", "Normal\n"),
    ("online_kernel", "online", "Normal\n"),
    ("online_movable", "online", "Movable\n"),
    ("offline", "offline", "Normal Movable\n"),
])
def test_auto_online_blocks_decides_state_and_zone(word, state, zone_text):
    tree = default_tree()
    hp = MemoryHotplug(tree, MB, auto_online_blocks=word)
    hp.add_memory_driver_managed(0x100000000, 2 * MB, "System RAM (kmem)", object())
    for mb_id in (32, 33):
        assert hp.blocks[mb_id].show("state") == f"{state}\n"
        assert hp.blocks[mb_id].show("valid_zones") == zone_text


@pytest.mark.parametrize("name", ["System RAM", "System RAM (virtio_mem", "RAM (x)"])
def test_add_rejects_bad_names(name):
    hp = MemoryHotplug(default_tree(), MB)
    with pytest.raises(HotplugError) as e:
        hp.add_memory_driver_managed(0x100000000, MB, name, object())
    assert errno_of(e) == errno.EINVAL


@pytest.mark.parametrize("start, size", [(0x100000000 + 2 * SZ_1M, MB), (0x100000000, MB + 2 * SZ_1M),
                                         (0x100000000, 0)])
def test_add_rejects_unaligned_ranges(start, size):
    hp = MemoryHotplug(default_tree(), MB)
    with pytest.raises(HotplugError) as e:
        hp.add_memory_driver_managed(start, size, NAME, object())
    assert errno_of(e) == errno.EINVAL


def test_add_over_busy_resource_is_eexist_and_changes_nothing():
    tree = default_tree()
    container = with_container(tree, 0x100000000, 4 * SZ_1G)
    tree.request_region(0x108000000, PAGE_SIZE, "squatter")
    hp = MemoryHotplug(tree, MB)
    before = lines(tree)
    with pytest.raises(HotplugError) as e:
        hp.add_memory_driver_managed(0x100000000, 2 * MB, NAME, object())
    assert errno_of(e) == errno.EEXIST
    assert lines(tree) == before
    assert 32 not in hp.blocks and 33 not in hp.blocks
    assert hp.high_memory_end == 0x7FFDFFFF
    assert len(container.children) == 1


# -- remove_memory / offline_and_remove_memory -------------------------------

def added(auto: str = "online") -> tuple[MemoryHotplug, Resource]:
    tree = default_tree()
    container = with_container(tree, 0x100000000, 4 * SZ_1G)
    hp = MemoryHotplug(tree, MB, auto)
    hp.add_memory_driver_managed(0x100000000, 4 * MB, NAME, object())
    return hp, container


def test_remove_memory_needs_offline_blocks():
    hp, container = added()
    with pytest.raises(HotplugError) as e:
        hp.remove_memory(0x108000000, MB)
    assert errno_of(e) == errno.EBUSY
    assert 33 in hp.blocks and container.children[0].end == 0x11FFFFFFF


def test_remove_from_the_middle_splits_the_resource_and_keeps_high_memory():
    hp, container = added()
    hp.store_state(33, "offline")
    hp.remove_memory(0x108000000, MB)
    # release_mem_region_adjustable (2.8): split into two identical-looking resources.
    assert [(r.start, r.end, r.name, r.flags) for r in container.children] == [
        (0x100000000, 0x107FFFFFF, NAME, 0x87000200), (0x110000000, 0x11FFFFFFF, NAME, 0x87000200)]
    assert sorted(b for b in hp.blocks if b >= 32) == [32, 34, 35]
    hp.offline_and_remove_memory(0x110000000, 2 * MB)
    assert [(r.start, r.end) for r in container.children] == [(0x100000000, 0x107FFFFFF)]
    assert hp.high_memory_end == 0x11FFFFFFF   # never lowered


def test_offline_and_remove_rolls_back_on_a_veto():
    hp, container = added("online_movable")
    hp.store_state(33, "offline")
    hp.store_state(33, "online_kernel")

    def veto_35(action, block):
        if action == MEM_GOING_OFFLINE and block.id == 35:
            raise HotplugError(errno.EBUSY, "no")
    hp.register_memory_notifier(veto_35)
    with pytest.raises(HotplugError) as e:
        hp.offline_and_remove_memory(0x100000000, 4 * MB)
    assert errno_of(e) == errno.EBUSY
    # Blocks 32..34 were offlined, then onlined again with their former zones.
    assert [(hp.blocks[i].state, hp.blocks[i].zone) for i in range(32, 36)] == [
        ("online", "Movable"), ("online", "Normal"), ("online", "Movable"), ("online", "Movable")]
    assert container.children[0].end == 0x11FFFFFFF


def test_changed_follows_adding_and_removing_memory():
    signal = MemoryChanged()
    tree = default_tree()
    with_container(tree, 0x100000000, 4 * SZ_1G)
    hp = MemoryHotplug(tree, MB, changed=signal)
    assert hp.changed is signal and MemoryHotplug(tree, MB).changed is not signal
    seen = []
    # Listeners run after the change: they see the new blocks and tree.
    signal.connect(lambda start, size: seen.append((start, size, [b for b in hp.blocks if b >= 32], lines(tree)[-1])))
    hp.add_memory_driver_managed(0x100000000, 2 * MB, NAME, object())
    for failing in (lambda: hp.add_memory_driver_managed(0x108000000, MB, NAME, object()),   # exists
                    lambda: hp.remove_memory(0x108000000, MB)):                              # online
        with pytest.raises(HotplugError):
            failing()
    hp.offline_and_remove_memory(0x108000000, MB)
    assert seen == [(0x100000000, 2 * MB, [32, 33], f"  100000000-10fffffff : {NAME}"),
                    (0x108000000, MB, [32], f"  100000000-107ffffff : {NAME}")]


# -- unmovable memory (has_unmovable_pages) ----------------------------------

def test_unmovable_memory_makes_offlining_ebusy_before_any_notifier():
    hp, container = added()
    hp.alloc_unmovable(33, 10 * SZ_1M)
    calls = []
    hp.register_memory_notifier(lambda action, block: calls.append((action, block.id)))
    for offline in (lambda: hp.store_state(33, "offline"), lambda: hp.store_online(33, "0"),
                    lambda: hp.offline_and_remove_memory(0x100000000, 4 * MB)):
        with pytest.raises(HotplugError) as e:
            offline()
        assert errno_of(e) == errno.EBUSY and str(e.value) == "[Errno 16] unmovable pages in memory33, ZONE_NORMAL"
    # Only offline_and_remove_memory() got to a notifier: memory32 went offline and came back.
    assert calls == [(MEM_GOING_OFFLINE, 32), (MEM_OFFLINE, 32), (MEM_GOING_ONLINE, 32), (MEM_ONLINE, 32)]
    assert all(hp.blocks[i].state == "online" for i in range(32, 36))
    assert container.children[0].end == 0x11FFFFFFF


def test_has_unmovable_pages_finds_the_block_whose_unmovable_memory_overlaps():
    hp, _ = added()
    hp.alloc_unmovable(33, 3 * SZ_1M)
    start = 0x108000000
    assert hp.has_unmovable_pages(start + 3 * SZ_1M - 1, 1) is hp.blocks[33]
    assert hp.has_unmovable_pages(start + 3 * SZ_1M, SZ_1M) is None
    assert hp.has_unmovable_pages(0x100000000, MB) is None
    assert hp.has_unmovable_pages(0x100000000, MB + 1) is hp.blocks[33]
    assert hp.has_unmovable_pages(0x100000000, 4 * MB) is hp.blocks[33]


# -- sysfs writes ------------------------------------------------------------

def test_state_writes():
    hp, _ = added()
    with pytest.raises(HotplugError) as e:
        hp.store_state(32, "online\n")          # already online
    assert errno_of(e) == errno.EINVAL
    hp.store_state(32, "offline\n")
    assert hp.blocks[32].show("state") == "offline\n"
    assert hp.blocks[32].show("online") == "0\n"
    with pytest.raises(HotplugError) as e:
        hp.store_state(32, "offline")
    assert errno_of(e) == errno.EINVAL
    with pytest.raises(HotplugError) as e:
        hp.store_state(32, "up")
    assert errno_of(e) == errno.EINVAL
    hp.store_state(32, "online_movable")
    assert hp.blocks[32].show("valid_zones") == "Movable\n"


def test_online_file_accepts_current_state_and_kstrtobool_words():
    hp, _ = added()
    hp.store_online(32, "1\n")                  # already online: success
    hp.store_online(32, "off")
    assert hp.blocks[32].state == "offline"
    hp.store_online(32, "n")                    # already offline: success
    hp.store_online(32, "y")
    assert (hp.blocks[32].state, hp.blocks[32].zone) == ("online", "Normal")
    with pytest.raises(HotplugError) as e:
        hp.store_online(32, "2")
    assert errno_of(e) == errno.EINVAL
    assert [kstrtobool(w) for w in ("Yes", "t", "ON", "oF", "0", "false")] == [True, True, True, False, False, False]


def test_memory0_cannot_be_offlined_and_unknown_blocks_do_not_exist():
    hp = MemoryHotplug(default_tree(), MB)
    with pytest.raises(HotplugError) as e:
        hp.store_state(0, "offline")
    assert errno_of(e) == errno.EINVAL
    hp.store_state(3, "offline")
    assert hp.blocks[3].show("valid_zones") == "DMA32 Movable\n"
    with pytest.raises(HotplugError) as e:
        hp.store_state(20, "online")
    assert errno_of(e) == errno.ENOENT


def test_going_online_veto_keeps_block_offline():
    hp, _ = added("offline")
    hp.register_memory_notifier(deny_onlining)
    with pytest.raises(HotplugError) as e:
        hp.store_state(32, "online")
    assert errno_of(e) == errno.EPERM
    assert (hp.blocks[32].state, hp.blocks[32].zone) == ("offline", None)


def test_auto_online_veto_is_silent():
    tree = default_tree()
    hp = MemoryHotplug(tree, MB)
    hp.register_memory_notifier(deny_onlining)
    hp.add_memory_driver_managed(0x100000000, MB, NAME, object())
    assert hp.blocks[32].state == "offline"


def test_auto_online_blocks_file():
    hp = MemoryHotplug(default_tree(), MB)
    assert hp.auto_online_blocks_show() == "online\n"
    hp.set_auto_online_blocks("online_movable\n")
    assert hp.auto_online_blocks_show() == "online_movable\n"
    with pytest.raises(HotplugError) as e:
        hp.set_auto_online_blocks("movable")
    assert errno_of(e) == errno.EINVAL
    assert hp.auto_online_blocks == "online_movable"
