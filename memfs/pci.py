"""A PCI function for each virtio-mem device (virtio-mem-pci), as QEMU and Linux show it in /proc/iomem.

Each device is a function on bus 0 with a 16 KiB modern-virtio BAR that the
virtio-pci driver claims (`virtio-pci-modern`). A dump already shows the
functions of the devices it was taken with; a machine with more devices
than that gets the next free slot and the next free 16 KiB of the bridge
window that holds the first one (QEMU's BIOS assigns BARs in that window),
or nothing on layouts without such a window (arm).
"""
from __future__ import annotations

import re

from .kernel.ioport import IORESOURCE_MEM, IORESOURCE_WINDOW, Resource
from .kernel.resource import ResourceTree

MODERN_BAR = "virtio-pci-modern"
BAR_SIZE = 0x4000
_FUNCTION = re.compile(r"0000:00:([0-9a-f]{2})\.([0-7])")


def _bars(tree: ResourceTree) -> list[Resource]:
    return [r for r, _ in tree.walk() if r.name == MODERN_BAR and r.parent is not None
            and _FUNCTION.fullmatch(r.parent.name or "")]


def add_virtio_pci_function(tree: ResourceTree, index: int) -> Resource | None:
    """Give device number `index` a PCI function unless the tree already shows index+1 of them.

    Returns the new function resource, or None (already there, or no window to put it in).
    Changes nothing when it returns None.
    """
    bars = _bars(tree)
    if len(bars) > index or not bars:
        return None
    function = bars[-1].parent
    window = function.parent if function is not None else None
    if window is None or not window.flags & IORESOURCE_WINDOW:
        return None
    used = {int(m.group(1), 16) for r, _ in tree.walk() if (m := _FUNCTION.fullmatch(r.name or ""))}
    slot = next(s for s in range(1, 32) if s not in used)
    start = bars[-1].end + 1
    for child in sorted(window.children, key=lambda c: c.start):
        if child.end >= start and child.start < start + BAR_SIZE:
            start = -(-(child.end + 1) // BAR_SIZE) * BAR_SIZE
    if start + BAR_SIZE - 1 > window.end:
        return None
    new = tree.insert_resource(Resource(start, start + BAR_SIZE - 1, f"0000:00:{slot:02x}.0", IORESOURCE_MEM),
                               window)
    tree.request_region(start, BAR_SIZE, MODERN_BAR, parent=new)
    return new
