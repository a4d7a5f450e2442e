"""Who is asking: the capabilities the kernel checks, read from /proc for a FUSE request's pid."""
from __future__ import annotations

CAP_SYS_RAWIO = 17  # open_mem(): capable(CAP_SYS_RAWIO)
CAP_SYS_ADMIN = 21  # r_show(): file_ns_capable(..., CAP_SYS_ADMIN)


def has_capability(pid: int, uid: int, cap: int) -> bool:
    """Whether `pid` holds `cap` in its effective set.

    Falls back to "uid 0" when the process is gone or /proc cannot say
    (the request raced with the caller's exit).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return uid == 0
