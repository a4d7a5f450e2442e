"""Who is asking: capabilities as the kernel checks them, read from /proc for a FUSE request's pid.

The kernel checks /dev/mem's CAP_SYS_RAWIO (`capable()`) and /proc/iomem's
CAP_SYS_ADMIN (`file_ns_capable(file, &init_user_ns, ...)`) against the
initial user namespace. cap_capable() then grants a capability only to a
task whose credentials live in that namespace and hold it in their effective
set: root inside a child user namespace (`unshare -Ur`) holds nothing there.
The daemon's own user namespace stands for the initial one.
"""
from __future__ import annotations

import os

CAP_SYS_RAWIO = 17  # open_mem(): capable(CAP_SYS_RAWIO)
CAP_SYS_ADMIN = 21  # r_show(): file_ns_capable(file, &init_user_ns, CAP_SYS_ADMIN)

_INIT_USER_NS = os.readlink("/proc/self/ns/user")


def has_capability(pid: int, cap: int) -> bool:
    """has_ns_capability_noaudit(task, &init_user_ns, cap) for the task `pid`.

    False when the task is in another user namespace, lacks the capability in
    its effective set, or is gone (the request raced with its exit).
    """
    try:
        if os.readlink(f"/proc/{pid}/ns/user") != _INIT_USER_NS:
            return False
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False
