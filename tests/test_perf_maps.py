"""The cost-saving structures of the read path give exactly what the plain ones give (model level).

* PolicyMap / ContentMap redo only the address range a tree change touched: after any
  sequence of changes they equal a full rebuild, and a resize costs evaluations in
  proportion to what it changed, not to the size of the tree.
* DevMem.try_read_mem() (one-run fast path, cached last run) answers as the kernel's
  per-run loop of read_mem() does over freshly built maps.
* proc/iomem: one rendered text per (tree generation, privileged), shared by opens; an
  open keeps the text it saw.
* The audit stores refusals as tuples and formats them when read.
"""
from __future__ import annotations

import errno
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memfs.kernel.devmem as devmem_module
from memfs.audit import Audit, Opener
from memfs.bus import Bus, ContentMap
from memfs.control import Control, ControlError
from memfs.fuse import layout
from memfs.infer import infer_flags
from memfs.kernel.devmem import PolicyMap
from memfs.kernel.iomem import parse, render
from memfs.kernel.ioport import (IORESOURCE_BUSY, IORESOURCE_EXCLUSIVE, IORESOURCE_MEM, IORESOURCE_READONLY,
                                 IORESOURCE_SYSTEM_RAM, IORESOURCE_WINDOW, Resource)
from memfs.kernel.mem import AccessError, BusFault, DevMem, Refusal
from memfs.kernel.resource import ResourceConflict, ResourceTree
from memfs.kernel.sizes import PAGE_SHIFT
from memfs.loader import load_machine
from memfs.physmem import SparseMemory
from memfs.settings import Config

from conftest import DUMPS

GIB = 1 << 30
CONFIGS = [Config.of(s) for s in ({}, {"IO_STRICT_DEVMEM": "n"}, {"iomem": "relaxed"}, {"arch": "arm64"},
                                  {"EXCLUSIVE_SYSTEM_RAM": "n", "iomem": "relaxed"},
                                  {"region_intersects": "toplevel"})]
FLAGS = [IORESOURCE_MEM, IORESOURCE_MEM | IORESOURCE_BUSY, IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY,
         IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE, IORESOURCE_MEM | IORESOURCE_BUSY | IORESOURCE_EXCLUSIVE,
         IORESOURCE_MEM | IORESOURCE_READONLY | IORESOURCE_BUSY, IORESOURCE_MEM | IORESOURCE_WINDOW]


def assert_maps_fresh(tree: ResourceTree, config: Config, devmem: DevMem, bus: Bus) -> None:
    """The incrementally kept maps equal maps built from scratch now."""
    full = PolicyMap(tree, config)
    kept = devmem._fresh()
    assert (kept.starts, kept.verdicts) == (full.starts, full.verdicts)
    content = ContentMap(tree, bus.devices)
    kept_content = bus._content()
    assert (kept_content.starts, kept_content.kinds) == (content.starts, content.kinds)


def mutate(tree: ResourceTree, draw) -> None:
    """One change through the tree's own functions; a refused one changes nothing."""
    everything = [r for r, _ in tree.walk()]
    op = draw(st.sampled_from(["request", "region", "insert", "release", "flags", "adjust", "merge"]))
    pick = draw(st.integers(0, max(0, len(everything) - 1)))
    target = everything[pick] if everything else tree.root
    span = max(1, target.end - target.start + 1)
    start = target.start + draw(st.integers(0, span - 1)) // 4096 * 4096
    size = draw(st.sampled_from([1, 4096, 0x3000, 0x100000, span]))
    flags = draw(st.sampled_from(FLAGS))
    try:
        if op == "request":
            tree.request_resource(Resource(start, start + size - 1, "new", flags), root=target)
        elif op == "region":
            tree.request_region(start, size, "claim", flags & IORESOURCE_EXCLUSIVE)
        elif op == "insert":
            tree.insert_resource(Resource(start, start + size - 1, "container", flags))
        elif op == "release" and everything:
            tree.release_resource(target)
        elif op == "flags" and everything:
            tree.set_flags(target, flags)
        elif op == "adjust":
            tree.release_mem_region_adjustable(start, size)
        elif op == "merge" and everything:
            tree.merge_system_ram_resource(target)
    except ResourceConflict:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DUMPS), st.sampled_from(CONFIGS), st.data())
def test_incremental_maps_equal_a_full_rebuild(path, config, data):
    tree = parse(path.read_text())
    infer_flags(tree)
    devmem = DevMem(tree, config, bus=None, phys_bits=52, high_memory_end=lambda: (1 << 64) - 1)
    bus = Bus(tree, SparseMemory(1 << 40))
    devmem._fresh(), bus._content()  # built once: from here on only updated
    for _ in range(data.draw(st.integers(1, 6), label="batches")):
        for _ in range(data.draw(st.integers(1, 4), label="changes in a batch")):
            mutate(tree, data.draw)
        assert_maps_fresh(tree, config, devmem, bus)


def test_incremental_maps_follow_control_commands():
    """Plug, unplug and resize through the driver (request_region, merge, adjustable release)."""
    m = load_machine(settings={"memhp_default_state": "online_movable"})
    ctl = Control(m)
    m.devmem._fresh(), m.bus._content()
    for command in ("virtio0 requested-size 3G", "virtio0 unplug 0x100000000 0x200000",
                    "virtio0 unplug 0x140000000 0x8000000", "virtio0 plug 0x140000000 0x200000",
                    "virtio0 requested-size 512M", "virtio0 unplug-all", "virtio0 requested-size 4G",
                    "virtio0 requested-size 0"):
        try:
            ctl.execute(command.encode())
        except ControlError:
            pass
        assert_maps_fresh(m.tree, m.config, m.devmem, m.bus)


def test_a_resize_costs_what_it_changed_not_the_tree(monkeypatch):
    """10,000 resources: a resize re-evaluates devmem_is_allowed() for a handful of pages, not 10,000."""
    lines = ["00000000-00000fff : Reserved", "00001000-0009fbff : System RAM",
             "00100000-7fffffff : System RAM", "80000000-bfffffff : PCI Bus 0000:00"]
    lines += [f"  {0x80000000 + i * 0x4000:08x}-{0x80000000 + i * 0x4000 + 0x3fff:08x} : "
              f"0000:{i >> 8:02x}:{i >> 3 & 0x1f:02x}.{i & 7}" for i in range(10_000)]
    dump = "\n".join(lines + ["100000000-17fffffff : System RAM"]) + "\n"
    toml = (f'phys_bits = 41\niomem_text = """\n{dump}"""\n[settings]\nmemhp_default_state = "online_movable"\n'
            f'[[virtio_mem]]\naddr = "0x10000000000"\nregion_size = "64G"\nrequested_size = "0"\n')
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"memfs-perf-{os.getpid()}.toml")
    with open(path, "w") as f:
        f.write(toml)
    try:
        m = load_machine(machine_file=path)
    finally:
        os.unlink(path)
    m.devmem.read_mem(0x80000000, 4096)
    calls = []
    real = devmem_module.devmem_is_allowed
    monkeypatch.setattr(devmem_module, "devmem_is_allowed", lambda *a: calls.append(a[2]) or real(*a))
    Control(m).execute(b"virtio0 requested-size 8G")
    assert m.devmem.read_mem(0x80000000, 4096) == bytes(4096)
    assert 0 < len(calls) < 100, len(calls)
    monkeypatch.undo()
    assert_maps_fresh(m.tree, m.config, m.devmem, m.bus)


@pytest.mark.parametrize("settings_", [{"arch": "arm64", "iomem": "relaxed"}, {"arch": "arm64", "IO_STRICT_DEVMEM": "n"},
                                       {}, {"iomem": "relaxed"}], ids=str)
def test_policy_map_groups_a_partly_covered_first_page_apart(settings_):
    """RAM starting inside a page: that page is not page_is_ram(), the next ones are (arm64)."""
    tree = ResourceTree()
    tree.request_resource(Resource(0x1800, 0x4FFF, "System RAM", IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY))
    tree.request_resource(Resource(0x8000, 0x9BFF, "System RAM", IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY))
    config = Config.of(settings_)
    policy = PolicyMap(tree, config)
    for pfn in range(12):
        assert policy.verdict(pfn) == devmem_module.devmem_is_allowed(tree, config, pfn), pfn


# -- try_read_mem against the kernel's loop over fresh maps -------------------------------------

def reference_read_mem(devmem: DevMem, bus: Bus, p: int, count: int, fresh: dict):
    """read_mem() as the model had it before the fast path: the kernel's loop a run at a time,
    here over maps built from scratch; bytes or (errno, rule, start, end)."""
    end = p + count - 1
    if not devmem.valid_phys_addr_range(p, count):
        return (errno.EFAULT, None, p, end)
    if fresh.get("generation") != devmem.tree.generation:
        fresh.update(generation=devmem.tree.generation, policy=PolicyMap(devmem.tree, devmem.config),
                     content=ContentMap(bus.tree, bus.devices))
    if devmem.config.strict_devmem:
        runs = list(fresh["policy"].runs(p >> PAGE_SHIFT, end >> PAGE_SHIFT)) if count else []
    else:
        runs = [(p >> PAGE_SHIFT, end >> PAGE_SHIFT, None)] if count else []
    parts = []
    for first, last, verdict in runs:
        start, stop = max(p, first << PAGE_SHIFT), min(end + 1, (last + 1) << PAGE_SHIFT)
        if verdict is not None and verdict.allowed == 0:
            return (errno.EPERM, verdict.rule, start, stop - 1)
        if verdict is not None and verdict.allowed == 2:
            parts.append(bytes(stop - start))
            continue
        for at, n, kind, device in fresh["content"].runs(start, stop - start):
            try:
                parts.append(bus._load(at, n, kind, device))
            except BusFault as e:
                return (errno.EFAULT, None, e.addr, None)
    return b"".join(parts)


@pytest.mark.parametrize("settings_", [{}, {"STRICT_DEVMEM": "n"}, {"iomem": "relaxed"}, {"arch": "arm64"}],
                         ids=str)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_try_read_mem_answers_as_the_kernel_loop(settings_, data):
    m = load_machine(settings=settings_)
    m.memory.write(0x9F000, b"\x11" * 0x2000)
    edges = sorted({e for r, _ in m.tree.walk() for e in (r.start, r.end + 1)} | {0x100000, 0x140000000})
    fresh: dict = {}
    for _ in range(12):
        p = max(0, data.draw(st.sampled_from(edges)) + data.draw(st.integers(-0x3000, 0x3000)))
        count = data.draw(st.sampled_from([0, 1, 8, 4096, 0x2001, 0x6000]))
        want = reference_read_mem(m.devmem, m.bus, p, count, fresh)
        got = m.devmem.try_read_mem(p, count)
        if isinstance(want, bytes):
            assert got == want
            assert m.devmem.read_mem(p, count) == want
        else:
            assert isinstance(got, Refusal)
            assert (got.errno, got.start) == (want[0], want[2])
            if want[1] is not None:
                assert (got.rule, got.end) == (want[1], want[3])
            with pytest.raises(AccessError) as e:
                m.devmem.read_mem(p, count)
            assert (e.value.errno, e.value.rule, e.value.start, e.value.end) == tuple(got)
        if data.draw(st.booleans()):  # a change in between: the cached last run must not answer stale
            try:
                Control(m).execute(data.draw(st.sampled_from(
                    [b"virtio0 requested-size 2G", b"virtio0 requested-size 0", b"virtio0 requested-size 1G"])))
            except ControlError:
                pass


# -- proc/iomem -------------------------------------------------------------------------------------

def test_iomem_opens_share_one_text_and_keep_what_they_saw():
    m = load_machine(settings={"memhp_default_state": "online_movable"})
    root = layout.build(m, layout.DevMemFile(m, lambda opener, mapped: None))
    iomem = root.find("proc").find("iomem")
    me = Opener(os.getpid(), "test", 0)
    first, second = iomem.open(me, os.O_RDONLY), iomem.open(me, os.O_RDONLY)
    assert first.data is second.data  # one rendered text, not one per open
    assert first.data == render(m.tree, True).encode()
    Control(m).execute(b"virtio0 requested-size 2G")
    third = iomem.open(me, os.O_RDONLY)
    assert third.data == render(m.tree, True).encode() != first.data
    assert first.data == second.data  # the earlier opens keep their snapshot


@pytest.mark.parametrize("path", DUMPS[:8], ids=lambda p: p.name)
def test_render_is_r_show(path):
    tree = parse(path.read_text())
    assert render(tree, True) == path.read_text()
    width = 4 if tree.root.end < 0x10000 else 8
    zero = "0" * width
    want = "".join(f"{'  ' * min(d, 5)}{zero}-{zero} : {'<BAD>' if r.name is None else r.name}\n"
                   for r, d in tree.walk())
    assert render(tree, False) == want


# -- the audit ----------------------------------------------------------------------------------------

def test_audit_formats_refusals_when_read():
    a = Audit(limit=3)
    who = Opener(42, "tool", 7)
    for i in range(5):
        a.refuse(who, "read", 0x1000 * i, 0x1000 * i + 0xFFF, "EPERM", "rule text")
    text = a.text()
    assert text.startswith("# 5 refused accesses, oldest 2 dropped\n")
    lines = text.splitlines()[1:]
    assert len(lines) == 3 and len(a.records) == 3
    assert re.fullmatch(r"\d\d:\d\d:\d\d pid=42 comm=tool uid=7 read \[0x2000-0x2fff\] EPERM: rule text", lines[0])
    assert a.records[-1].start == 0x4000 and a.records[-1].opener == who
