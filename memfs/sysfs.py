"""The sysfs files memfs serves, as attribute tables (drivers/base/memory.c's DEVICE_ATTR_RO/_RW).

Pure model: an attribute is a name, a show, an optional store, and the mode
that follows from them. Every store runs the drivers' pending work
afterwards, as the kernel's workqueue would (onlining memory requeues a
virtio-mem driver stopped at its offline threshold). A machine with a
journal records every store (its path under sys/devices/system/memory and
the text) before running it; `store` replays one.

The NUMA side (drivers/base/node.c): which nodes exist, their nodemask files
under sys/devices/system/node, and the links between memoryN and nodeM.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .kernel.memory_hotplug import MEMORY_BLOCK_ATTRS, ZONE_MOVABLE, HotplugError
from .machine import Machine

MEMORY_PREFIX = "memory"
NODE_PREFIX = "node"
CPU_POSSIBLE = "/sys/devices/system/cpu/possible"
LOCAL_DISTANCE, REMOTE_DISTANCE = 10, 20   # include/linux/topology.h


@dataclass(frozen=True)
class Attr:
    """One sysfs attribute: mode 0644 with a store, 0444 without."""

    name: str
    show: Callable[[], str]
    store: Callable[[str], None] | None = None

    @property
    def mode(self) -> int:
        return 0o644 if self.store else 0o444


def _stored(machine: Machine, path: str, store: Callable[[str], None]) -> Callable[[str], None]:
    def run(text: str) -> None:
        with machine.logged({"sysfs": path, "value": text}):
            store(text)  # raises HotplugError (an OSError with the kernel's errno): nothing changed
            machine.run_pending_work()

    return run


def memory_attrs(machine: Machine) -> list[Attr]:
    """/sys/devices/system/memory/{block_size_bytes,auto_online_blocks}."""
    hp = machine.hotplug
    return [Attr("block_size_bytes", hp.block_size_bytes_show),
            Attr("auto_online_blocks", hp.auto_online_blocks_show,
                 _stored(machine, "auto_online_blocks", hp.set_auto_online_blocks))]


def memory_block_attrs(machine: Machine, mb_id: int) -> list[Attr]:
    """/sys/devices/system/memory/memoryN/*: state and online are writable (state_store, online_store)."""
    hp = machine.hotplug
    stores: dict[str, Callable[[str], None]] = {
        "state": lambda text: hp.store_state(mb_id, text),
        "online": lambda text: hp.store_online(mb_id, text),
    }
    def show(name: str) -> Callable[[], str]:
        return lambda: hp.block(mb_id).show(name)

    return [Attr(name, show(name), _stored(machine, f"{MEMORY_PREFIX}{mb_id}/{name}", stores[name])
                 if name in stores else None)
            for name in MEMORY_BLOCK_ATTRS]


def store(machine: Machine, path: str, text: str) -> None:
    """Write `text` to the attribute at `path` (`auto_online_blocks`, `memoryN/state`) as a write to the
    file would: HotplugError (ENOENT for a file that does not exist, EACCES for a read-only one) on failure."""
    directory, _, name = path.rpartition("/")
    mb_id = memory_block_id(directory) if directory else None
    if directory and (mb_id is None or mb_id not in machine.hotplug.blocks):
        raise HotplugError(errno.ENOENT, f"{path}: no such file")
    attrs = memory_block_attrs(machine, mb_id) if mb_id is not None else memory_attrs(machine)
    attr = next((a for a in attrs if a.name == name), None)
    if attr is None:
        raise HotplugError(errno.ENOENT, f"{path}: no such file")
    if attr.store is None:
        raise HotplugError(errno.EACCES, f"{path}: read-only")
    attr.store(text)


def _numbered(prefix: str, name: str) -> int | None:
    digits = name[len(prefix):]
    # isascii(): str.isdigit() also takes digits such as "²" that int() refuses
    if not name.startswith(prefix) or not (digits.isascii() and digits.isdigit()) or str(int(digits)) != digits:
        return None
    return int(digits)


def memory_block_id(name: str) -> int | None:
    """The mb_id of a directory name `memoryN` (N in decimal, no leading zeros), else None."""
    return _numbered(MEMORY_PREFIX, name)


def memory_block_ids(machine: Machine, start: int = 0) -> Iterator[int]:
    """The memory blocks that exist from mb_id `start` on, ascending (lazily: boot RAM may hold 2^33)."""
    return machine.hotplug.blocks.ids_from(start)


def node_id(name: str) -> int | None:
    """The nid of a directory name `nodeM` (M in decimal, no leading zeros), else None."""
    return _numbered(NODE_PREFIX, name)


def online_nodes(machine: Machine) -> list[int]:
    """node_states[N_ONLINE], ascending: node 0 (boot memory and the CPUs) and each virtio-mem device's node.

    QEMU refuses a device on a node the machine lacks, and only boot memory and the
    devices add memory blocks, so these are all the nodes a block can name.
    """
    return sorted({0} | {v.device.node_id for v in machine.virtio.values()})


def node_block_ids(machine: Machine, nid: int, start: int = 0) -> Iterator[int]:
    """The memory blocks linked under node `nid` (register_memory_block_under_node()) from mb_id
    `start` on, ascending. Boot memory is node 0's, so another node's blocks all lie in its
    devices' regions: only those are walked, never boot memory."""
    hp = machine.hotplug
    if nid == 0:
        return (mb_id for mb_id in hp.blocks.ids_from(start) if hp.blocks[mb_id].nid == 0)
    regions = sorted((v.device.addr, v.device.addr + v.device.region_size) for v in machine.virtio.values()
                     if v.device.node_id == nid)
    first = start * hp.block_size
    return (block.id for lo, hi in regions if hi > first
            for block in hp.blocks_in(max(lo, first), hi - max(lo, first)) if block.nid == nid)


def bitmap_list_string(bits: Iterable[int]) -> str:
    """A node or CPU mask as "%*pbl" prints it (bitmap_list_string()): ascending runs, "0-1,3"."""
    runs: list[list[int]] = []
    for bit in sorted(set(bits)):
        if runs and runs[-1][1] == bit - 1:
            runs[-1][1] = bit
        else:
            runs.append([bit, bit])
    return ",".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in runs)


def bitmap_string(bits: Iterable[int], nbits: int) -> str:
    """A mask of `nbits` bits as "%*pb" prints it (bitmap_string()): 32-bit hex words, most
    significant first, comma-separated; the first one padded to the bits it holds ("3" for 2 CPUs)."""
    value = sum(1 << bit for bit in set(bits))
    words = max(-(-nbits // 32), 1)
    first_width = -(-(nbits % 32 or 32) // 4)
    return ",".join(f"{(value >> (32 * i)) & 0xFFFFFFFF:0{first_width if i == words - 1 else 8}x}"
                    for i in reversed(range(words)))


def parse_cpulist(text: str) -> list[int]:
    """bitmap_parselist(): "0-3,8" -> [0, 1, 2, 3, 8]; ValueError on anything else."""
    bits: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        bits.extend(range(int(lo), int(hi or lo) + 1))
    return bits


def host_cpus() -> list[int]:
    """The host's cpu_possible_mask. Tools meet its /sys/devices/system/cpu (memfs run keeps the
    real one), so node 0 holds those CPUs; os.cpu_count() if it cannot be read."""
    try:
        with open(CPU_POSSIBLE) as f:
            return parse_cpulist(f.read())
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


def _has_memory(machine: Machine, nid: int, normal: bool) -> bool:
    blocks = (machine.hotplug.blocks[mb_id] for mb_id in node_block_ids(machine, nid))
    return any(block.online and not (normal and block.zone == ZONE_MOVABLE) for block in blocks)


def node_attrs(machine: Machine) -> list[Attr]:
    """/sys/devices/system/node/*: node_state_attr[] as show_node_state() prints each nodemask.

    Every node is possible and online from boot; a node has memory (N_MEMORY) while one of
    its blocks is online, normal memory (N_NORMAL_MEMORY) while one is online in a zone up to
    ZONE_NORMAL (node_states_check_changes_online()); the CPUs are node 0's.
    """
    def mask(nids: Callable[[], Iterable[int]]) -> Callable[[], str]:
        return lambda: bitmap_list_string(nids()) + "\n"

    def having(normal: bool) -> Callable[[], Iterable[int]]:
        return lambda: (nid for nid in online_nodes(machine) if _has_memory(machine, nid, normal))

    return [Attr("possible", mask(lambda: online_nodes(machine))),
            Attr("online", mask(lambda: online_nodes(machine))),
            Attr("has_normal_memory", mask(having(True))),
            Attr("has_memory", mask(having(False))),
            Attr("has_cpu", mask(lambda: [0])),
            Attr("has_generic_initiator", mask(list))]


def node_cpu_attrs(machine: Machine, nid: int) -> list[Attr]:
    """nodeM/{cpumap,cpulist,distance}: node_read_cpumap() ("%*pb" over nr_cpu_ids bits, then "%*pbl")
    and node_read_distance() (node_distance() to every online node). The CPUs are node 0's; QEMU
    without -numa dist gives LOCAL_DISTANCE to itself and REMOTE_DISTANCE to the others."""
    cpus = host_cpus()
    mine = cpus if nid == 0 else []
    nr_cpu_ids = max(cpus, default=0) + 1
    return [Attr("cpumap", lambda: bitmap_string(mine, nr_cpu_ids) + "\n"),
            Attr("cpulist", lambda: bitmap_list_string(mine) + "\n"),
            Attr("distance", lambda: " ".join(str(LOCAL_DISTANCE if n == nid else REMOTE_DISTANCE)
                                              for n in online_nodes(machine)) + "\n")]


def node_cpu_links(nid: int) -> list[tuple[str, str]]:
    """register_cpu_under_node(): nodeM/cpuN -> ../../cpu/cpuN for each CPU of the node."""
    return [(f"cpu{cpu}", f"../../cpu/cpu{cpu}") for cpu in (host_cpus() if nid == 0 else [])]


def node_link(nid: int) -> tuple[str, str]:
    """The link do_register_memory_block_under_node() puts in memoryN: (name, target)."""
    return f"{NODE_PREFIX}{nid}", f"../../node/{NODE_PREFIX}{nid}"


def memory_block_link(mb_id: int) -> tuple[str, str]:
    """Its reverse link, put in nodeM: (name, target)."""
    return f"{MEMORY_PREFIX}{mb_id}", f"../../memory/{MEMORY_PREFIX}{mb_id}"
