"""MOUNT/control commands and the status files (memory-devices, sysfs memory blocks).

One command per write. A command either does what it says, or fails with an
errno and a message and changes nothing; a requested-size change that the
driver cannot fully reach is not a failure: its result says how far it got
(as QEMU's qom-set succeeds and the guest converges on its own).

    virtioN requested-size SIZE     qom-set vmN requested-size SIZE; the driver converges
    virtioN plug ADDR SIZE          the driver plugs exactly that range
    virtioN unplug ADDR SIZE        the driver unplugs exactly that range
    virtioN unplug-all              UNPLUG_ALL
    help                            this list
"""
from __future__ import annotations

import errno
from collections.abc import Callable

from .audit import Opener
from .kernel.memory_hotplug import MEMORY_BLOCK_ATTRS, HotplugError
from .machine import Machine, VirtioMem
from .units import parse_addr, parse_size

USAGE = __doc__.split("\n\n")[2]

Render = Callable[[Opener], str]
Write = Callable[[Opener, str], None]


class ControlError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class Control:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        policy = " ".join(f"{k}={v}" for k, v in machine.config.describe().items())
        policy += f" memhp_default_state={machine.auto_online_blocks}"
        self.result = f"ok: machine {machine.name}; policy {policy}\n" + USAGE + "\n"

    # -- MOUNT/control -------------------------------------------------------

    def last_result(self, opener: Opener) -> str:
        return self.result

    def execute(self, opener: Opener, text: str) -> None:
        """Run one command; its result (or error) is what reading control shows next."""
        words = text.split()
        try:
            self.result = self._dispatch(words) + "\n"
        except ControlError as e:
            self.result = f"error: {errno.errorcode[e.errno]}: {e}\n"
            raise

    def _dispatch(self, words: list[str]) -> str:
        if not words:
            raise ControlError(errno.EINVAL, "empty command; " + _usage_hint())
        if words == ["help"]:
            return "ok\n" + USAGE
        name, *rest = words
        v = self.machine.virtio.get(name)
        if v is None:
            known = ", ".join(self.machine.virtio) or "none on this machine"
            raise ControlError(errno.ENODEV, f"no virtio-mem device {name!r} (devices: {known})")
        verb, args = (rest[0], rest[1:]) if rest else ("", [])
        try:
            if verb == "requested-size" and len(args) == 1:
                return self._requested_size(name, v, parse_size(args[0]))
            if verb in ("plug", "unplug") and len(args) == 2:
                addr, size = parse_addr(args[0]), parse_size(args[1])
                op = v.driver.plug_range if verb == "plug" else v.driver.unplug_range
                op(addr, size)
                self.machine.changed(addr, size)
                return f"ok: {name} {verb}ged [{addr:#x}-{addr + size - 1:#x}]; {self._state(v)}"
            if verb == "unplug-all" and not args:
                v.driver.unplug_all()
                self.machine.changed(v.device.addr, v.device.region_size)
                return f"ok: {name} unplugged everything; {self._state(v)}"
        except ValueError as e:
            raise ControlError(errno.EINVAL, str(e)) from None
        except OSError as e:
            raise ControlError(e.errno or errno.EIO, e.strerror or str(e)) from None
        raise ControlError(errno.EINVAL, f"cannot parse {' '.join(words)!r}; " + _usage_hint())

    def _requested_size(self, name: str, v: VirtioMem, size: int) -> str:
        v.device.set_requested_size(size)
        return self._converge(name, v)

    def _converge(self, name: str, v: VirtioMem) -> str:
        """Run the driver's work item and say how far it got."""
        size = v.device.requested_size
        outcome = v.driver.run()
        self.machine.changed(v.device.addr, v.device.region_size)
        if outcome.converged:
            return f"ok: {name} requested-size {size}: converged; {self._state(v)}"
        why = f"{errno.errorcode.get(-outcome.rc, outcome.rc)}: {outcome.reason}" if outcome.rc else outcome.reason
        retry = f", the driver retries in {outcome.retry_ms} ms" if outcome.retry_ms else ""
        if outcome.rc == -errno.ENOSPC and v.driver.offline_size:
            retry += ("; online memory (sys/devices/system/memory/memoryN/state) and the driver goes on, "
                      "or mount with --set memhp_default_state=online")
        return f"partial: {name} requested-size {size}: stopped ({why}{retry}); {self._state(v)}"

    @staticmethod
    def _state(v: VirtioMem) -> str:
        d = v.device
        return (f"plugged {d.plugged_size} of requested {d.requested_size} "
                f"(usable region {d.usable_region_size}, region {d.region_size})")

    # -- status files ------------------------------------------------------------

    def memory_devices(self) -> str:
        """QEMU's `info memory-devices`."""
        return "".join(v.device.info_memory_devices() for v in self.machine.virtio.values())

    def audit(self) -> str:
        """Refused /dev/mem accesses, then each device's count of accesses to unplugged memory."""
        lines = [self.machine.audit.text()]
        for name, v in self.machine.virtio.items():
            seen = v.device.violations
            lines.append(f"# {name}: accesses to unplugged memory (virtio spec violations): "
                         f"read {seen['read']}, write {seen['write']}\n")
        return "".join(lines)

    def sysfs_files(self, rest: tuple[str, ...]) -> dict[str, tuple[Render, Write | None] | None] | None:
        """/sys/devices/system/memory below the given path: name -> (show, store) or None for a directory."""
        hp = self.machine.hotplug
        if rest == ():
            files: dict[str, tuple[Render, Write | None] | None] = {
                "block_size_bytes": (lambda _: hp.block_size_bytes_show(), None),
                "auto_online_blocks": (lambda _: hp.auto_online_blocks_show(),
                                       self._sysfs_store(lambda text: hp.set_auto_online_blocks(text))),
            }
            files.update({f"memory{mb_id}": None for mb_id in sorted(hp.blocks)})
            return files
        if len(rest) == 1 and rest[0].startswith("memory") and rest[0][6:].isdigit():
            mb_id = int(rest[0][6:])
            if mb_id not in hp.blocks or rest[0] != f"memory{mb_id}":
                return None
            stores = {"state": lambda text: hp.store_state(mb_id, text),
                      "online": lambda text: hp.store_online(mb_id, text)}
            return {attr: (lambda _, a=attr: hp.block(mb_id).show(a),
                           self._sysfs_store(stores[attr]) if attr in stores else None)
                    for attr in MEMORY_BLOCK_ATTRS}
        return None

    def _sysfs_store(self, store: Callable[[str], None]) -> Write:
        def write(opener: Opener, text: str) -> None:
            try:
                store(text)
            except HotplugError as e:
                raise ControlError(e.errno, str(e)) from None
            # Onlining memory can requeue a driver's work item (one stopped at the offline threshold).
            for name, v in self.machine.virtio.items():
                if v.driver.work_pending:
                    self.result = self._converge(name, v) + "\n"

        return write


def _usage_hint() -> str:
    return "commands: 'virtioN requested-size SIZE', 'virtioN plug ADDR SIZE', 'virtioN unplug ADDR SIZE', " \
           "'virtioN unplug-all', 'help'"
