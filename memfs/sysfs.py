"""The sysfs files memfs serves, as attribute tables (drivers/base/memory.c's DEVICE_ATTR_RO/_RW).

Pure model: an attribute is a name, a show, an optional store, and the mode
that follows from them. Every store runs the drivers' pending work
afterwards, as the kernel's workqueue would (onlining memory requeues a
virtio-mem driver stopped at its offline threshold). A machine with a
journal records every store (its path under sys/devices/system/memory and
the text) before running it; `store` replays one.
"""
from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .kernel.memory_hotplug import MEMORY_BLOCK_ATTRS, HotplugError
from .machine import Machine

MEMORY_PREFIX = "memory"


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


def memory_block_id(name: str) -> int | None:
    """The mb_id of a directory name `memoryN` (N in decimal, no leading zeros), else None."""
    digits = name[len(MEMORY_PREFIX):]
    if not name.startswith(MEMORY_PREFIX) or not digits.isdigit() or str(int(digits)) != digits:
        return None
    return int(digits)


def memory_block_ids(machine: Machine, start: int = 0) -> Iterator[int]:
    """The memory blocks that exist from mb_id `start` on, ascending (lazily: boot RAM may hold 2^33)."""
    return machine.hotplug.blocks.ids_from(start)
