"""The /dev/mem policy matrix (spec 2.12, 4.4, 4.8, 5.1, 5.2) on a tree with one page of each kind."""
from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.infer import infer_flags
from memfs.kernel.devmem import PolicyMap, devmem_is_allowed
from memfs.kernel.mem import DevMem
from memfs.kernel.iomem import parse
from memfs.kernel.ioport import (
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_MEM,
    IORESOURCE_READONLY,
    IORESOURCE_SYSRAM_DRIVER_MANAGED,
    IORESOURCE_SYSTEM_RAM,
    IORESOURCE_WINDOW,
    Resource,
)
from memfs.kernel.resource import ResourceTree
from memfs.settings import Config, SettingError

RAM = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
from conftest import DUMPS as REAL_DUMPS  # noqa: E402


def build_tree() -> ResourceTree:
    t = ResourceTree()
    t.request_resource(Resource(0x1000, 0x9FBFF, "System RAM", RAM))
    low = t.request_resource(Resource(0xF0000, 0xFFFFF, "Reserved", IORESOURCE_MEM | IORESOURCE_BUSY))
    t.request_resource(Resource(0xF0000, 0xFFFFF, "System ROM", IORESOURCE_MEM | IORESOURCE_BUSY | IORESOURCE_READONLY),
                       root=low)
    t.request_resource(Resource(0x100000, 0x7FFFFFFF, "System RAM", RAM))
    win = t.request_resource(Resource(0xC0000000, 0xFEBFFFFF, "PCI Bus 0000:00", IORESOURCE_MEM | IORESOURCE_WINDOW))
    t.request_resource(Resource(0xFD000000, 0xFDFFFFFF, "0000:00:01.0", IORESOURCE_MEM), root=win)
    bar = t.request_resource(Resource(0xFE000000, 0xFE003FFF, "0000:00:02.0", IORESOURCE_MEM), root=win)
    t.request_region(0xFE000000, 0x4000, "virtio-pci-modern", parent=bar)
    t.request_region(0xFED00000, 0x1000, "exclusive-driver", IORESOURCE_EXCLUSIVE)
    container = t.request_region(0x100000000, 0x100000000, "virtio0", IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE)
    container.flags &= ~IORESOURCE_BUSY
    t.request_region(0x100000000, 0x8000000, "System RAM (virtio_mem)",
                     IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED)
    return t


PAGES = {
    "low_ram": 0x2000, "partial_ram": 0x9F000, "rom": 0xF0000, "ram": 0x200000, "bar_claimed": 0xFE000000,
    "bar_free": 0xFD000000, "exclusive": 0xFED00000, "vm_plugged": 0x100000000, "vm_unplugged": 0x180000000,
    "gap": 0x90000000,
}
COLUMNS = list(PAGES)

# page_is_allowed() for each page, straight from the spec's tables (0 refused, 1 allowed, 2 zeros).
MATRIX = [
    ({}, [2, 2, 1, 0, 0, 1, 0, 0, 0, 1]),
    ({"IO_STRICT_DEVMEM": "n"}, [2, 2, 1, 0, 1, 1, 0, 0, 0, 1]),
    ({"iomem": "relaxed"}, [2, 2, 1, 0, 1, 1, 1, 0, 0, 1]),
    ({"iomem": "relaxed", "EXCLUSIVE_SYSTEM_RAM": "n"}, [2, 2, 1, 0, 1, 1, 1, 0, 0, 1]),
    ({"STRICT_DEVMEM": "n"}, [1] * 10),
    ({"arch": "arm64"}, [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]),
    ({"arch": "arm64", "IO_STRICT_DEVMEM": "n"}, [0, 1, 1, 0, 1, 1, 0, 0, 0, 1]),
    ({"arch": "arm64", "iomem": "relaxed"}, [0, 1, 1, 0, 1, 1, 1, 0, 0, 1]),
    # before 5.16 on arm64: unplugged virtio-mem memory is neither RAM nor exclusive
    ({"arch": "arm64", "EXCLUSIVE_SYSTEM_RAM": "n"}, [0, 0, 0, 0, 0, 1, 0, 0, 1, 1]),
    ({"arch": "arm64", "EXCLUSIVE_SYSTEM_RAM": "n", "iomem": "relaxed"}, [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]),
    ({"arch": "arm64", "STRICT_DEVMEM": "n"}, [1] * 10),
]


@pytest.mark.parametrize("settings_,expected", MATRIX, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_policy_matrix(settings_, expected):
    devmem = DevMem(build_tree(), Config.of(settings_), bus=None, phys_bits=40, high_memory_end=lambda: 0)
    got = [devmem.page_is_allowed(PAGES[c] >> 12).allowed for c in COLUMNS]
    assert dict(zip(COLUMNS, got)) == dict(zip(COLUMNS, expected))


def test_refusal_names_the_rule():
    policy = PolicyMap(build_tree(), Config.of())
    assert "iomem_is_exclusive: virtio0 (SYSTEM_RAM|EXCLUSIVE)" in policy.verdict(0x180000).rule
    assert "virtio-pci-modern" in policy.verdict(0xFE000).rule
    assert "System RAM" in policy.verdict(0x200).rule


@pytest.mark.parametrize("settings_,message", [
    ({"STRICT_DEVMEM": "n", "EXCLUSIVE_SYSTEM_RAM": "y"}, "depends on !DEVMEM || STRICT_DEVMEM"),
    ({"STRICT_DEVMEM": "n", "IO_STRICT_DEVMEM": "y"}, "depends on STRICT_DEVMEM"),
    ({"arch": "sparc"}, "arch='sparc'"),
    ({"STRICT_DEVMEM": "yes"}, "expected one of y, n"),
    ({"iomem": "lax"}, "expected one of strict, relaxed"),
])
def test_bad_settings_are_clear_errors(settings_, message):
    with pytest.raises(SettingError, match=None) as e:
        Config.of(settings_)
    assert message in str(e.value)


def test_dependent_options_follow_strict_devmem():
    c = Config.of({"STRICT_DEVMEM": "n"})
    assert (c.io_strict_devmem, c.exclusive_system_ram, c.strict_iomem_checks) == (False, False, False)
    d = Config.of({})
    assert (d.arch, d.strict_devmem, d.io_strict_devmem, d.exclusive_system_ram, d.strict_iomem_checks) == (
        "x86_64", True, True, True, True)


DUMPS = REAL_DUMPS
CONFIGS = [Config.of(s) for s, _ in MATRIX]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DUMPS), st.sampled_from(CONFIGS), st.data())
def test_policy_map_equals_per_page_evaluation(path, config, data):
    """Grouping pages into runs must not change any page's answer."""
    tree = parse(path.read_text())
    infer_flags(tree)
    policy = PolicyMap(tree, config)
    edges = sorted({e for r, _ in tree.walk() for e in (r.start >> 12, r.end >> 12)} | {0})
    base = data.draw(st.sampled_from(edges))
    pfn = max(0, base + data.draw(st.integers(-2, 2)))
    assert policy.verdict(pfn) == devmem_is_allowed(tree, config, pfn)
