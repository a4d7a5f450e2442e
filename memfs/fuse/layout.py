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
from .nodes import (ControlFile, DevMemHandle, Dir, Handle, Node, REG, Symlink, SysfsAttr, TextFile,
                    fixed_dir, permanent)


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


def _numbered_dir(entries: Callable[[], list[tuple[str, Node]]], ids: Callable[[int], Iterator[int]],
                  number: Callable[[str], int | None], child: Callable[[int], tuple[str, Node]]) -> Dir:
    """`entries`, then a child per id of `ids(start)` (ascending from `start`), named and built by
    `child(id)` and found back by `number(name)`. The token of id N is len(entries) + 1 + N, so
    readdir resumes at an id without walking those before it (boot RAM may hold 2^33 blocks)."""
    def listing(after: int) -> Iterator[tuple[int, str, Node]]:
        fixed = entries()
        for token, (name, node) in enumerate(fixed[after:], after + 1):
            yield token, name, node
        for n in ids(max(after - len(fixed), 0)):
            yield (len(fixed) + 1 + n, *child(n))

    def find(name: str) -> Node | None:
        n = number(name)
        if n is not None:
            return child(n)[1] if next(ids(n), None) == n else None
        return next((node for k, node in entries() if k == name), None)

    return Dir(listing, find)


def _link(name_target: tuple[str, str]) -> tuple[str, Node]:
    return name_target[0], Symlink(name_target[1])


def _memory_dir(machine: Machine) -> Dir:
    """/sys/devices/system/memory: memoryN holds its attributes and the link to its node.

    The kernel keeps a memoryN's entries for as long as the block exists: nothing in one
    changes but what its files show, and the adapter invalidates the entry of a block that
    goes away (MemfsOps._forget_removed_blocks).
    """
    def block(mb_id: int) -> tuple[str, Node]:
        attrs = dict(_attrs(sysfs.memory_block_attrs(machine, mb_id)))
        name, link = _link(sysfs.node_link(machine.hotplug.blocks[mb_id].nid))
        return f"{sysfs.MEMORY_PREFIX}{mb_id}", permanent(fixed_dir(attrs | {name: link}))

    return _numbered_dir(lambda: list(_attrs(sysfs.memory_attrs(machine))),
                         lambda start: sysfs.memory_block_ids(machine, start), sysfs.memory_block_id, block)


def _node_dir(machine: Machine) -> Dir:
    """/sys/devices/system/node: the nodemask files, and nodeM (register_one_node()) holding its
    CPU files and links, and a link to each of its memory blocks."""
    def node(nid: int) -> tuple[str, Node]:
        def own() -> list[tuple[str, Node]]:
            return [*_attrs(sysfs.node_cpu_attrs(machine, nid)), *map(_link, sysfs.node_cpu_links(nid))]

        links = _numbered_dir(own, lambda start: sysfs.node_block_ids(machine, nid, start),
                              sysfs.memory_block_id, lambda mb_id: _link(sysfs.memory_block_link(mb_id)))
        return f"{sysfs.NODE_PREFIX}{nid}", links

    return _numbered_dir(lambda: list(_attrs(sysfs.node_attrs(machine))),
                         lambda start: (nid for nid in sysfs.online_nodes(machine) if nid >= start),
                         sysfs.node_id, node)


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
    system = fixed_dir({"memory": _memory_dir(machine), "node": _node_dir(machine)})
    return permanent(fixed_dir({
        "dev": fixed_dir({"mem": devmem}, 0o755),
        "proc": fixed_dir({"iomem": TextFile(_IomemText(machine)),
                           "meminfo": TextFile(lambda _: meminfo.meminfo(machine))}),
        "sys": fixed_dir({"devices": fixed_dir({"system": system}),
                          "firmware": _firmware_dir(machine)}),
        "control": ControlFile(control),
        "memory-devices": TextFile(lambda _: status.memory_devices(machine)),
        "audit": TextFile(lambda _: status.audit(machine), 0o400),
        memmap.MAP_FILE: TextFile(lambda _: memmap.render_svg(machine)),
    }, 0o755))
