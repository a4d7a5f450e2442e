"""One simulated machine, assembled: resource tree, settings, memory, bus, devices, /dev/mem.

Assembly only: the rules live in the parts (kernel/mem.py for /dev/mem,
bus.py for what addresses read as, virtio_mem/ and kernel/memory_hotplug.py
for plugging memory).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager

from .audit import Audit
from .bus import Bus
from .changes import MemoryChanged
from .firmware import Firmware
from .kernel.mem import DevMem
from .kernel.memory_hotplug import MemoryHotplug, max_pfn_end, memory_block_size_bytes
from .kernel.resource import ResourceTree
from .physmem import Stores
from .settings import Config
from .virtio_mem.device import VirtioMemDevice
from .virtio_mem.driver import RunResult, VirtioMemDriver

if TYPE_CHECKING:
    from .journal import Journal


@dataclass
class VirtioMem:
    """A virtio-mem device (QEMU side) and the Linux driver bound to it."""

    device: VirtioMemDevice
    driver: VirtioMemDriver


@dataclass
class Machine:
    """The parts of one machine; `changed` is raised whenever what a physical range reads as changes.

    `stores` says where memory lives (anonymous by default, files with a
    backing dir); `description` is what the machine was built from (set by
    the loader); `journal`, when set, records every state change before it
    is applied (memfs.journal).
    """

    tree: ResourceTree
    config: Config
    phys_bits: int
    name: str = "machine"
    firmware: Firmware | None = None
    virtio: dict[str, VirtioMem] = field(default_factory=dict)
    stores: Stores = field(default_factory=Stores)

    def __post_init__(self) -> None:
        self.changed = MemoryChanged()
        self.audit = Audit()
        self.description: dict[str, Any] = {}
        self.journal: Journal | None = None
        self.memory = self.stores.open("ram", 1 << self.phys_bits)
        self.hotplug = MemoryHotplug(self.tree, memory_block_size_bytes(max_pfn_end(self.tree)),
                                     self.config.memhp_default_state, changed=self.changed)
        self.bus = Bus(self.tree, self.memory, self.firmware)
        if self.firmware is not None:
            self.bus.seed_ram(self.firmware.pieces)
        self.devmem = DevMem(self.tree, self.config, self.bus, self.phys_bits, lambda: self.hotplug.high_memory_end)

    @property
    def size(self) -> int:
        """Top of the physical address space (what st_size of dev/mem reports)."""
        return 1 << self.phys_bits

    def logged(self, entry: dict[str, str]) -> ContextManager[None]:
        """Around one state change: journal `entry` first, settle the journal after (no-op without one)."""
        return nullcontext() if self.journal is None else self._logged(self.journal, entry)

    @contextmanager
    def _logged(self, journal: Journal, entry: dict[str, str]) -> Iterator[None]:
        journal.record(entry)
        try:
            yield
        finally:
            journal.settle(self)

    def add_virtio_mem(self, linux_name: str, device: VirtioMemDevice) -> VirtioMem:
        """Plug a device in and bind the Linux driver to it (probed at boot())."""
        v = VirtioMem(device, VirtioMemDriver(device, self.hotplug, linux_name,
                                              unmovable_size=self.config.zone_normal_unmovable))
        self.virtio[linux_name] = v
        self.bus.attach(device)
        return v

    def device(self, name: str) -> VirtioMem | None:
        """A virtio-mem device by its Linux name (virtio0) or its QEMU id (vmem0)."""
        return self.virtio.get(name) or next((v for v in self.virtio.values() if v.device.id == name), None)

    def run_pending_work(self) -> list[tuple[str, RunResult]]:
        """Run every driver whose work item is queued (virtio_mem_run_wq()), as the kernel's
        workqueue would after a config change or a memory notifier requeued it."""
        return [(name, v.driver.run()) for name, v in self.virtio.items() if v.driver.work_pending]

    def boot(self) -> None:
        """Probe every virtio-mem driver and let it converge on its requested size."""
        for v in self.virtio.values():
            v.driver.probe()
            v.driver.run()
