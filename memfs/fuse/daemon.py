"""The daemon's life: prepare the mount point, mount, serve, stop on a signal, unmount.

`start` forks the daemon and returns once the mount is ready (or says why
it failed); `unmount` detaches a mount, dead or alive. Nothing here knows
what the files mean (ops.py and the model do).
"""
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
    """The mount point cannot be used, or a mount failed; the message says what to run."""


def mounted(mountpoint: str) -> bool:
    """Whether something is mounted at `mountpoint`, without touching it (a dead mount hangs stat)."""
    return _device(mountpoint) is not None


def _fusermount(mountpoint: str, lazy: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint],
                          capture_output=True, text=True, timeout=30)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount; raises MountError saying why (nothing mounted, busy) and what to run."""
    if not mounted(mountpoint):
        raise MountError(f"umount {mountpoint}: nothing is mounted there")
    done = _fusermount(mountpoint, lazy)
    if done.returncode != 0:
        hint = "" if lazy else f" (a busy mount can be detached with: memfs umount --lazy {mountpoint})"
        raise MountError(f"umount {mountpoint}: {done.stderr.strip()}{hint}")


def prepare_mountpoint(mountpoint: str) -> str | None:
    """Make `mountpoint` usable; returns a note if a dead mount had to be cleared.

    A daemon that died leaves its mount behind: every access fails with
    ENOTCONN ("Transport endpoint is not connected") until it is unmounted.
    """
    try:
        st = os.stat(mountpoint)
        if os.path.ismount(mountpoint):
            # The kernel may answer stat from cached attributes; opening the directory always
            # reaches the daemon, so a dead one shows (ENOTCONN).
            os.close(os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY))
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: no such directory (create it with: mkdir -p {mountpoint})") from None
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"{mountpoint}: {e.strerror}") from None
        done = _fusermount(mountpoint, lazy=True)
        if done.returncode != 0:
            raise MountError(f"{mountpoint}: left behind by a dead daemon and could not be cleared "
                             f"({done.stderr.strip()}); run: fusermount3 -u -z {mountpoint}") from None
        return f"cleared a dead memfs mount left at {mountpoint}"
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: not a directory")
    if os.path.ismount(mountpoint) and st.st_dev != os.stat(os.path.dirname(os.path.abspath(mountpoint))).st_dev:
        raise MountError(f"{mountpoint}: something is already mounted there (unmount it with: memfs umount {mountpoint})")
    return None


def start(machine: Machine, mountpoint: str, allow_other: bool, log_setup: Callable[[], None]) -> int:
    """Fork the daemon, wait until it serves; returns its pid or raises MountError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        status = 1
        try:
            log_setup()
            serve(machine, mountpoint, allow_other, ready=lambda: os.write(write_end, b"ready\n"))
            status = 0
        except BaseException as e:  # report why the mount failed to the waiting parent
            os.write(write_end, f"error {e}\n".encode())
            log.exception("daemon failed")
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.readline().strip()
    if answer != "ready":
        os.waitpid(pid, 0)
        raise MountError(f"mount failed: {answer.removeprefix('error ') or 'daemon exited'}")
    return pid


STOP_GRACE = 2.0  # seconds a stop waits for clients to let go before aborting the connection


def serve(machine: Machine, mountpoint: str, allow_other: bool = False,
          ready: Callable[[], object] | None = None) -> None:
    """Mount, call `ready`, serve until unmounted or SIGTERM/SIGINT/SIGHUP, then unmount."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=memfs", "subtype=memfs"}
    if allow_other:
        options.add("allow_other")
    ops = MemfsOps(machine)
    pyfuse3.init(ops, mountpoint, options)
    log.info("mounted %s at %s", machine.name, mountpoint)
    device = _device(mountpoint)
    _no_readahead(device, mountpoint)
    try:
        trio.run(_main, ops, mountpoint, device, ready)
    finally:
        ops.restorer.stop()   # its thread uses the session: it must end before the session does
        pyfuse3.close(unmount=mounted(mountpoint))
        log.info("unmounted %s", mountpoint)


def _device(mountpoint: str) -> str | None:
    """The mount's device number (MAJOR:MINOR; the minor is its fusectl connection), from mountinfo.

    realpath() or stat() would touch the mount, which waits for a loop that is not running yet.
    """
    target = os.path.abspath(mountpoint).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[2]
    return None


def _no_readahead(device: str | None, mountpoint: str) -> None:
    """Turn the mount's readahead off: touching one mapped page must ask for that page only,
    never for neighbours the process did not touch (they may be refused or unplugged)."""
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write("0")
    except OSError as e:
        log.warning("could not turn readahead off for %s: %s", mountpoint, e)


async def _main(ops: MemfsOps, mountpoint: str, device: str | None, ready: Callable[[], object] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, mountpoint, device, nursery.cancel_scope)
        if ready:
            ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(mountpoint: str, device: str | None, scope: trio.CancelScope) -> None:
    """Stop without ever freezing a client.

    The loop keeps serving while the mount is detached: write-backs and
    invalidations in flight need it to finish. Once clients have let go the
    kernel ends the session and pyfuse3.main() returns; if they have not
    within STOP_GRACE, the connection is aborted (as writing fusectl's
    `abort` does by hand), which fails what is pending instead of leaving
    processes in state D.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting %s", signum, mountpoint)
            break
    await trio.to_thread.run_sync(_fusermount, mountpoint, True)
    await trio.sleep(STOP_GRACE)
    log.warning("clients still hold %s after %.0f s: aborting the FUSE connection", mountpoint, STOP_GRACE)
    _abort(device, mountpoint)
    # Stop serving: closing /dev/fuse aborts the connection too, should fusectl have failed.
    scope.cancel()


def _abort(device: str | None, mountpoint: str) -> None:
    """Write fusectl's `abort` for the mount's connection (mounting fusectl if it is not)."""
    connections = "/sys/fs/fuse/connections"
    if not os.path.isdir(f"{connections}/{(device or ':').split(':')[1]}"):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", connections], capture_output=True, timeout=10)
    try:
        with open(f"{connections}/{(device or ':').split(':')[1]}/abort", "w") as f:
            f.write("1")
    except OSError as e:
        log.error("could not abort the FUSE connection of %s: %s; closing it instead", mountpoint, e)
