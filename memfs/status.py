"""The read-only status files of the mount: memory-devices and audit."""
from __future__ import annotations

from .machine import Machine


def memory_devices(machine: Machine) -> str:
    """QEMU's `info memory-devices`, one entry per virtio-mem device."""
    return "".join(v.device.info_memory_devices() for v in machine.virtio.values())


def audit(machine: Machine) -> str:
    """Refused /dev/mem accesses, then each device's count of accesses to unplugged memory."""
    lines = [machine.audit.text()]
    for name, v in machine.virtio.items():
        seen = v.device.violations
        lines.append(f"# {name}: accesses to unplugged memory (virtio spec violations): "
                     f"read {seen['read']}, write {seen['write']}\n")
    return "".join(lines)
