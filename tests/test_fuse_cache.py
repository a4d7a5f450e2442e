"""Which entries and attributes the kernel may keep (the FUSE adapter's answer to LOOKUP/GETATTR)."""
from __future__ import annotations

from memfs.fuse.ops import MemfsOps
from memfs.loader import load_machine


def timeouts(ops: MemfsOps, *path: str) -> tuple[float, float]:
    attr = ops._attr(path, ops._node(path))
    return attr.entry_timeout, attr.attr_timeout


def test_what_never_changes_is_cached_what_comes_and_goes_is_asked_afresh():
    ops = MemfsOps(load_machine(None))
    memory = ("sys", "devices", "system", "memory")
    # memoryN too: the adapter invalidates a block's entry when it goes (test_mount_fidelity checks)
    for path in [(), ("dev",), ("dev", "mem"), ("proc", "iomem"), ("control",), ("sys", "devices", "system"),
                 memory, ("sys", "firmware", "dmi", "tables", "DMI"), memory + ("memory5",),
                 memory + ("memory5", "state"), memory + ("memory5", "node0")]:
        assert min(timeouts(ops, *path)) >= 60, path
    # the node links come and go with the blocks and are not invalidated: looked up on every walk
    for path in [("sys", "devices", "system", "node", "node0"), ("sys", "devices", "system", "node", "node0", "memory5"),
                 memory + ("auto_online_blocks",)]:
        assert timeouts(ops, *path) == (0, 0), path
