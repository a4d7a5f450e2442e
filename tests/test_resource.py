"""kernel/resource.c semantics (spec section 2), checked against the spec's own examples."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.kernel.iomem import render
from memfs.kernel.ioport import (
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_MEM,
    IORESOURCE_SYSRAM_DRIVER_MANAGED,
    IORESOURCE_SYSTEM_RAM,
    Resource,
)
from memfs.kernel.resource import (
    REGION_DISJOINT,
    REGION_INTERSECTS,
    REGION_MIXED,
    ResourceConflict,
    ResourceTree,
)

RAM = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY


def lines(tree: ResourceTree) -> list[str]:
    return render(tree, True).splitlines()


def check_invariants(node: Resource) -> None:
    """Spec 2.1: children sorted by start, never overlapping, inside the parent."""
    prev = None
    for c in node.children:
        assert c.parent is node
        assert node.start <= c.start <= c.end <= node.end
        if prev is not None:
            assert prev.end < c.start
        prev = c
        check_invariants(c)


def test_request_resource_links_sorted_and_refuses_overlap_without_change():
    t = ResourceTree()
    t.request_resource(Resource(0x2000, 0x2FFF, "b"))
    t.request_resource(Resource(0x1000, 0x1FFF, "a"))
    before = lines(t)
    with pytest.raises(ResourceConflict) as e:
        t.request_resource(Resource(0x1800, 0x27FF, "c"))
    assert "'c'" in str(e.value) and "'a'" in str(e.value)  # names both parties
    assert e.value.errno == 16  # EBUSY
    assert lines(t) == before == ["00001000-00001fff : a", "00002000-00002fff : b"]


def test_insert_resource_adopts_covered_and_descends_into_container():
    t = ResourceTree()
    t.request_resource(Resource(0x1000, 0x1FFF, "a"))
    t.request_resource(Resource(0x2000, 0x2FFF, "b"))
    t.insert_resource(Resource(0x0, 0x3FFF, "outer"))
    t.insert_resource(Resource(0x1100, 0x11FF, "inner"))
    # identical range: the new resource becomes the parent of the old one
    t.insert_resource(Resource(0x2000, 0x2FFF, "same"))
    assert lines(t) == [
        "00000000-00003fff : outer",
        "  00001000-00001fff : a",
        "    00001100-000011ff : inner",
        "  00002000-00002fff : same",
        "    00002000-00002fff : b",
    ]
    with pytest.raises(ResourceConflict):  # straddles a's end
        t.insert_resource(Resource(0x1800, 0x27FF, "straddle"))
    check_invariants(t.root)


def test_request_region_nests_below_non_busy_only_and_inherits_type():
    t = ResourceTree()
    container = t.request_region(0x100000000, 0x100000000, "virtio0", IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE)
    container.flags &= ~IORESOURCE_BUSY
    blk = t.request_region(0x100000000, 0x8000000, "System RAM (virtio_mem)",
                           IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED)
    assert blk.parent is container
    assert blk.flags == 0x83000200  # spec 2.9
    assert container.flags == 0x09000200  # spec 6.2
    with pytest.raises(ResourceConflict):  # inside a busy resource
        t.request_region(0x100001000, 0x1000, "x")
    with pytest.raises(ResourceConflict):  # leaves the non-busy container
        t.request_region(0x1FFFFF000, 0x2000, "y")


def test_release_mem_region_adjustable_splits_and_trims():
    t = ResourceTree()
    name_id = object()
    r = t.request_region(0x140000000, 0x20000000, "System RAM (virtio_mem)", IORESOURCE_SYSTEM_RAM, name_id=name_id)
    t.release_mem_region_adjustable(0x148000000, 0x8000000)  # middle block
    assert lines(t) == ["140000000-147ffffff : System RAM (virtio_mem)",
                        "150000000-15fffffff : System RAM (virtio_mem)"]
    tail = t.root.children[1]
    assert tail.flags == r.flags and tail.name_id is name_id
    t.release_mem_region_adjustable(0x140000000, 0x8000000)  # exact match: gone
    t.release_mem_region_adjustable(0x158000000, 0x8000000)  # end trimmed
    assert lines(t) == ["150000000-157ffffff : System RAM (virtio_mem)"]


def test_merge_system_ram_resource_needs_same_name_pointer():
    t = ResourceTree()
    dev_a, dev_b = object(), object()
    blocks = []
    for i, owner in enumerate([dev_a, dev_a, dev_b]):
        res = t.request_region(0x100000000 + i * 0x8000000, 0x8000000, "System RAM (virtio_mem)",
                               IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED, name_id=owner)
        blocks.append(t.merge_system_ram_resource(res))
    assert blocks[1] is blocks[0]
    assert blocks[0].flags == 0x87000200
    assert lines(t) == ["100000000-10fffffff : System RAM (virtio_mem)",
                        "110000000-117ffffff : System RAM (virtio_mem)"]


def _spec_2_11_tree() -> ResourceTree:
    t = ResourceTree()
    t.request_resource(Resource(0x10000000, 0x17FFFFFF, "System RAM", RAM))
    w = t.request_resource(Resource(0x20000000, 0x3FFFFFFF, "Window", IORESOURCE_MEM))
    t.request_resource(Resource(0x20000000, 0x27FFFFFF, "System RAM (x)", RAM), root=w)
    t.request_resource(Resource(0x30000000, 0x37FFFFFF, "System RAM (x)", RAM), root=w)
    return t


@pytest.mark.parametrize("start,size,old,new", [
    (0x10000000, 0x1000, REGION_INTERSECTS, REGION_INTERSECTS),
    (0x17FFF000, 0x2000, REGION_INTERSECTS, REGION_INTERSECTS),
    (0x20000000, 0x1000, REGION_DISJOINT, REGION_INTERSECTS),
    (0x27FFF000, 0x2000, REGION_DISJOINT, REGION_MIXED),
    (0x17FFF000, 0x9000000, REGION_MIXED, REGION_INTERSECTS),
    (0x28000000, 0x1000, REGION_DISJOINT, REGION_DISJOINT),
])
def test_region_intersects_worked_example(start, size, old, new):
    """The table of spec 2.11, old (top level only) and new (b4afe4183ec7) algorithm."""
    t = _spec_2_11_tree()
    assert t.region_intersects(start, size, IORESOURCE_SYSTEM_RAM, descend=False) == old
    assert t.region_intersects(start, size, IORESOURCE_SYSTEM_RAM, descend=True) == new


@pytest.mark.parametrize("flags,strict,io_strict,new_rule,expected", [
    # spec 2.12 truth table, rows x columns; new_rule=False is the rule before 5.16
    (IORESOURCE_MEM, True, False, True, False),
    (IORESOURCE_MEM, True, True, True, False),
    (IORESOURCE_MEM, False, True, True, False),
    (IORESOURCE_MEM | IORESOURCE_BUSY, True, False, True, False),
    (IORESOURCE_MEM | IORESOURCE_BUSY, True, True, True, True),
    (IORESOURCE_MEM | IORESOURCE_BUSY, False, True, True, False),
    (IORESOURCE_MEM | IORESOURCE_BUSY | IORESOURCE_EXCLUSIVE, True, False, True, True),
    (IORESOURCE_MEM | IORESOURCE_BUSY | IORESOURCE_EXCLUSIVE, False, False, True, False),
    (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE, True, False, True, True),
    (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE, False, False, True, True),
    (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE | IORESOURCE_BUSY, False, False, True, True),
    (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE, False, False, False, False),
    (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE, True, True, False, False),
    (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE | IORESOURCE_BUSY, True, False, False, True),
])
def test_iomem_is_exclusive_truth_table(flags, strict, io_strict, new_rule, expected):
    t = ResourceTree()
    outer = t.request_resource(Resource(0x100000, 0x1FFFFF, "outer", IORESOURCE_MEM))
    target = t.request_resource(Resource(0x180000, 0x1BFFFF, "target", flags), root=outer)
    for addr in (0x180000, 0x1BF123):
        hit = t.iomem_is_exclusive(addr, strict=strict, io_strict=io_strict, exclusive_system_ram=new_rule)
        assert (hit is target) == expected
    assert t.iomem_is_exclusive(0x17F000, strict=True, io_strict=True) is None


def test_page_is_ram_needs_busy_ram_covering_the_whole_page():
    t = ResourceTree()
    t.request_resource(Resource(0x1000, 0x9FBFF, "System RAM", RAM))
    t.request_resource(Resource(0x100000, 0x1FFFFF, "virtio0", IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE))
    assert t.page_is_ram(0x1)
    assert not t.page_is_ram(0x9F)  # only partly RAM
    assert not t.page_is_ram(0x100)  # non-busy container is not RAM


ops = st.lists(st.tuples(st.sampled_from(["request", "insert", "region", "release"]),
                         st.integers(0, 63), st.integers(1, 16)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_operations_keep_invariants_and_failures_change_nothing(sequence):
    t = ResourceTree()
    for op, start_page, pages in sequence:
        start, end = start_page * 0x1000, (start_page + pages) * 0x1000 - 1
        before = lines(t)
        try:
            if op == "request":
                t.request_resource(Resource(start, end, f"r{start_page}"))
            elif op == "insert":
                t.insert_resource(Resource(start, end, f"i{start_page}"))
            elif op == "region":
                t.request_region(start, end - start + 1, f"busy{start_page}")
            else:
                victims = [r for r, _ in t.walk() if r.start <= start <= r.end]
                if victims:
                    t.release_resource(victims[-1])
        except ResourceConflict:
            assert lines(t) == before
        check_invariants(t.root)
        # the index-based lookup agrees with a plain scan of the tree
        probe = start + 0x800
        chain = t.lookup(probe)
        expected = []
        node = t.root
        while True:
            inside = [c for c in node.children if c.start <= probe <= c.end]
            if not inside:
                break
            node = inside[0]
            expected.append(node)
        assert chain == expected
