"""MOUNT/control: the command language, parsed and dispatched to the model.

One command per write. A command either does what it says, or fails with an
errno and a message and changes nothing; a requested-size change that the
driver cannot fully reach is not a failure: its result says how far it got
(as QEMU's qom-set succeeds and the guest converges on its own). A device is
named by its Linux name (virtio0) or its QEMU id. With a backing dir, every
command but help is journaled before it runs (memfs.journal).

    DEV requested-size SIZE     qom-set DEV requested-size SIZE; the driver converges
    DEV plug ADDR SIZE          the driver plugs exactly that range
    DEV unplug ADDR SIZE        the driver unplugs exactly that range
    DEV unplug-all              UNPLUG_ALL
    help                        this list
"""
from __future__ import annotations

import errno

from .machine import Machine, VirtioMem
from .units import parse_addr, parse_size
from .virtio_mem.driver import RunResult

USAGE = (__doc__ or "").split("\n\n")[2]
MAX_COMMAND = 4096  # sysfs stores take at most a page; so does a command


class ControlError(Exception):
    """A failed command: errno and the message reading control shows."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err

    def result(self) -> str:
        return f"error: {errno.errorcode[self.errno]}: {self}\n"


class Control:
    """Commands against one machine; `execute` returns the result text or raises ControlError."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def banner(self) -> str:
        """What reading control shows before this opener ran a command."""
        return f"ok: machine {self.machine.name}; policy {self.machine.config.describe()}\n{USAGE}\n"

    def execute(self, data: bytes) -> str:
        """Run one command (one write's bytes); raises ControlError and changes nothing if it fails."""
        if len(data) >= MAX_COMMAND:
            raise ControlError(errno.EINVAL, f"a command is one write of less than {MAX_COMMAND} bytes, "
                                             f"not {len(data)}: nothing was run")
        try:
            words = data.decode().split()
        except UnicodeDecodeError as e:
            raise ControlError(errno.EINVAL, f"not UTF-8 text (byte {e.start}): nothing was run") from None
        if not words or words == ["help"]:
            return self._dispatch(words) + "\n"
        try:
            # Journaled first (a machine with a backing dir), then run: memfs.journal.
            with self.machine.logged({"ctl": " ".join(words)}):
                return self._dispatch(words) + "\n"
        except OSError as e:  # _dispatch turns its own into ControlError: this is the journal's
            raise ControlError(e.errno or errno.EIO, f"cannot journal the command ({e.strerror or e}): "
                                                     "nothing was run") from None

    def _dispatch(self, words: list[str]) -> str:
        if not words:
            raise ControlError(errno.EINVAL, "empty command; " + usage_hint())
        if words == ["help"]:
            return "ok\n" + USAGE
        name, *rest = words
        v = self.machine.device(name)
        if v is None:
            known = ", ".join(f"{n} ({x.device.id})" for n, x in self.machine.virtio.items()) or "none on this machine"
            raise ControlError(errno.ENODEV, f"no virtio-mem device {name!r} (devices: {known})")
        verb, args = (rest[0], rest[1:]) if rest else ("", [])
        try:
            if verb == "requested-size" and len(args) == 1:
                size = parse_size(args[0])
                v.device.set_requested_size(size)
                return describe_run(name, v, v.driver.run())
            if verb in ("plug", "unplug") and len(args) == 2:
                addr, size = parse_addr(args[0]), parse_size(args[1])
                (v.driver.plug_range if verb == "plug" else v.driver.unplug_range)(addr, size)
                return f"ok: {name} {verb}ged [{addr:#x}-{addr + size - 1:#x}]; {_state(v)}"
            if verb == "unplug-all" and not args:
                v.driver.unplug_all()
                return f"ok: {name} unplugged everything; {_state(v)}"
        except ValueError as e:
            raise ControlError(errno.EINVAL, str(e)) from None
        except OSError as e:
            raise ControlError(e.errno or errno.EIO, e.strerror or str(e)) from None
        raise ControlError(errno.EINVAL, f"cannot parse {' '.join(words)!r}; " + usage_hint())


def describe_run(name: str, v: VirtioMem, outcome: RunResult) -> str:
    """How far one run of the driver's work item got, in words."""
    size = v.device.requested_size
    if outcome.converged:
        return f"ok: {name} requested-size {size}: converged; {_state(v)}"
    why = f"{errno.errorcode.get(-outcome.rc, outcome.rc)}: {outcome.reason}" if outcome.rc else outcome.reason
    retry = f", the driver retries in {outcome.retry_ms} ms" if outcome.retry_ms else ""
    if outcome.rc == -errno.ENOSPC and v.driver.offline_size:
        retry += ("; online memory (sys/devices/system/memory/memoryN/state) and the driver goes on, "
                  "or mount with --set memhp_default_state=online")
    return f"partial: {name} requested-size {size}: stopped ({why}{retry}); {_state(v)}"


def _state(v: VirtioMem) -> str:
    d = v.device
    return (f"plugged {d.plugged_size} of requested {d.requested_size} "
            f"(usable region {d.usable_region_size}, region {d.region_size})")


def usage_hint() -> str:
    return ("commands: 'DEV requested-size SIZE', 'DEV plug ADDR SIZE', 'DEV unplug ADDR SIZE', "
            "'DEV unplug-all', 'help' (DEV: virtioN or the device's QEMU id)")

