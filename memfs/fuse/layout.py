"""The mount's namespace: which node lives at which path (mirroring the real paths, as LXCFS does)."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pyfuse3

from .. import meminfo, memmap, status, sysfs
from ..audit import Opener
from ..control import Control
from ..kernel.iomem import render
from ..kernel.resource import ResourceTree
from ..machine import Machine
from .creds import CAP_SYS_ADMIN, CAP_SYS_RAWIO, has_capability
from .nodes import ControlFile, DevMemHandle, Dir, Handle, Node, REG, SysfsAttr, TextFile, fixed_dir


LOFF_MAX = (1 << 63) - 1


class DevMemFile(Node):
    """MOUNT/dev/mem: mode 0600 root, st_size the top of the physical address space."""

    mode = REG | 0o600
    cache_attrs = True

    def __init__(self, machine: Machine, handle: Callable[[Opener, bool, bool], DevMemHandle]) -> None:
        self.size = min(machine.size, LOFF_MAX)  # st_size is a loff_t
        self.page_cache_all = machine.config.devmem_page_cache_all
        self.handle = handle

    def open(self, opener: Opener, flags: int) -> Handle:
        if not has_capability(opener.pid, CAP_SYS_RAWIO):
            raise pyfuse3.FUSEError(errno.EPERM)  # open_mem(): capable(CAP_SYS_RAWIO)
        # MAP_SHARED needs the page cache (libfuse 3.14); O_SYNC opens are the mapping tools'.
        return self.handle(opener, bool(flags & os.O_DSYNC) or self.page_cache_all,
                           flags & os.O_ACCMODE != os.O_RDONLY)


class _IomemText:
    """proc/iomem as an opener sees it: one rendered text per (tree generation, privileged),
    shared by every open made while it is current. An open keeps the text it got (a
    snapshot), so a change to the tree only makes the next open render anew; texts no open
    holds any more are freed."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._texts: dict[bool, tuple[ResourceTree, int, bytes]] = {}

    def __call__(self, opener: Opener) -> bytes:
        privileged = has_capability(opener.pid, CAP_SYS_ADMIN)
        tree = self.machine.tree
        cached = self._texts.get(privileged)
        if cached is None or cached[0] is not tree or cached[1] != tree.generation:
            cached = self._texts[privileged] = (tree, tree.generation, render(tree, privileged).encode())
        return cached[2]


def _attrs(attrs: list[sysfs.Attr]) -> Iterator[tuple[str, Node]]:
    return ((a.name, SysfsAttr(a.show, a.store)) for a in attrs)


def _memory_dir(machine: Machine) -> Dir:
    def block(mb_id: int) -> Dir:
        return fixed_dir(dict(_attrs(sysfs.memory_block_attrs(machine, mb_id))))

    def listing(after: int) -> Iterator[tuple[int, str, Node]]:
        attrs = list(_attrs(sysfs.memory_attrs(machine)))
        for token, (name, node) in enumerate(attrs[after:], after + 1):
            yield token, name, node
        for mb_id in sysfs.memory_block_ids(machine, max(after - len(attrs), 0)):
            yield len(attrs) + 1 + mb_id, f"{sysfs.MEMORY_PREFIX}{mb_id}", block(mb_id)

    def find(name: str) -> Node | None:
        mb_id = sysfs.memory_block_id(name)
        if mb_id is not None:
            return block(mb_id) if mb_id in machine.hotplug.blocks else None
        return next((node for n, node in _attrs(sysfs.memory_attrs(machine)) if n == name), None)

    return Dir(listing, find)


def _fixed(data: bytes) -> Callable[[Opener], bytes]:
    return lambda _: data


def _firmware_dir(machine: Machine) -> Dir:
    """/sys/firmware/{dmi,acpi}/tables: root-only binary files of the generated firmware (dmi_sysfs, acpi)."""
    tree: dict[str, dict[str, Node]] = {"dmi": {}, "acpi": {"dynamic": fixed_dir({})}}
    files = machine.firmware.sysfs() if machine.firmware is not None else {}
    for path, data in files.items():
        kind, _, name = path.split("/", 2)
        tree[kind][name] = TextFile(_fixed(data), 0o400, len(data))
    return fixed_dir({kind: fixed_dir({"tables": fixed_dir(entries)}) for kind, entries in tree.items()})


def build(machine: Machine, devmem: DevMemFile) -> Dir:
    """The root directory of a mount of `machine`."""
    control = Control(machine)
    return fixed_dir({
        "dev": fixed_dir({"mem": devmem}, 0o755),
        "proc": fixed_dir({"iomem": TextFile(_IomemText(machine)),
                           "meminfo": TextFile(lambda _: meminfo.meminfo(machine))}),
        "sys": fixed_dir({"devices": fixed_dir({"system": fixed_dir({"memory": _memory_dir(machine)})}),
                          "firmware": _firmware_dir(machine)}),
        "control": ControlFile(control),
        "memory-devices": TextFile(lambda _: status.memory_devices(machine)),
        "audit": TextFile(lambda _: status.audit(machine), 0o400),
        memmap.MAP_FILE: TextFile(lambda _: memmap.render_svg(machine)),
    }, 0o755)
