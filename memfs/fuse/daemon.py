"""Run the FUSE loop for one machine until unmounted or signalled."""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable

import pyfuse3
import trio

from ..machine import Machine
from .ops import MemfsOps

log = logging.getLogger("memfs.daemon")


class MountError(RuntimeError):
    """The mount point cannot be used; the message says what to run."""


def prepare_mountpoint(mountpoint: str) -> str | None:
    """Make `mountpoint` usable; returns a note if a dead mount had to be cleared.

    A daemon that died leaves its mount behind: every access fails with
    ENOTCONN ("Transport endpoint is not connected") until it is unmounted.
    """
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: no such directory (create it with: mkdir -p {mountpoint})") from None
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"{mountpoint}: {e.strerror}") from None
        done = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
        if done.returncode != 0:
            raise MountError(f"{mountpoint}: left behind by a dead daemon and could not be cleared "
                             f"({done.stderr.strip()}); run: fusermount3 -u -z {mountpoint}") from None
        return f"cleared a dead memfs mount left at {mountpoint}"
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: not a directory")
    if os.path.ismount(mountpoint) and st.st_dev != os.stat(os.path.dirname(os.path.abspath(mountpoint))).st_dev:
        raise MountError(f"{mountpoint}: something is already mounted there (unmount it with: memfs umount {mountpoint})")
    return None


def serve(machine: Machine, mountpoint: str, allow_other: bool = False,
          ready: Callable[[], None] | None = None) -> None:
    """Mount, call `ready`, serve until unmounted or SIGTERM/SIGINT, then unmount."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=memfs", "subtype=memfs"}
    if allow_other:
        options.add("allow_other")
    ops = MemfsOps(machine)
    pyfuse3.init(ops, mountpoint, options)
    log.info("mounted %s at %s", machine.name, mountpoint)
    _no_readahead(mountpoint)
    try:
        trio.run(_main, ready)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def _no_readahead(mountpoint: str) -> None:
    """Turn the mount's readahead off: touching one mapped page must ask for that page only,
    never for neighbours the process did not touch (they may be refused or unplugged)."""
    # realpath() would stat the mount, which waits for the loop that is not running yet
    target = os.path.abspath(mountpoint).replace(" ", "\\040")
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                dev = fields[2]
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write("0")
    except OSError as e:
        log.warning("could not turn readahead off for %s: %s", mountpoint, e)


async def _main(ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if ready:
            ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            scope.cancel()
            return
