"""Which entries and attributes the kernel may keep (the FUSE adapter's answer to LOOKUP/GETATTR)."""
from __future__ import annotations

from memfs.fuse.ops import MemfsOps
from memfs.loader import load_machine


def timeouts(ops: MemfsOps, *path: str) -> tuple[float, float]:
    attr = ops._attr(path, ops._node(path))
    return attr.entry_timeout, attr.attr_timeout


def test_what_never_changes_is_cached_what_comes_and_goes_is_asked_afresh():
    ops = MemfsOps(load_machine(None))
    for path in [(), ("dev",), ("dev", "mem"), ("proc", "iomem"), ("control",), ("sys", "devices", "system"),
                 ("sys", "devices", "system", "memory"), ("sys", "firmware", "dmi", "tables", "DMI")]:
        assert min(timeouts(ops, *path)) >= 60, path
    # memory blocks go away with hot-remove; what lies in them is looked up on every walk
    for path in [("sys", "devices", "system", "memory", "memory5"),
                 ("sys", "devices", "system", "memory", "memory5", "state"),
                 ("sys", "devices", "system", "memory", "auto_online_blocks"),
                 ("sys", "devices", "system", "node", "node0")]:
        assert timeouts(ops, *path) == (0, 0), path
