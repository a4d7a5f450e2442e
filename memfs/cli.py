"""memfs command line: mount | umount | ctl | iomem | map | run. Parsing and plumbing only."""
from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import sys
import tempfile
from collections.abc import Callable

from . import settings
from .loader import MachineError, load_machine
from .machine import Machine
from .physmem import Stores

LOG_BYTES = 1 << 20  # per log file; one older file is kept


def _settings(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MachineError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _machine(args: argparse.Namespace, stores: Stores | None = None) -> Machine:
    return load_machine(args.machine, args.iomem, _settings(args.set), stores)


def cmd_iomem(args: argparse.Namespace) -> int:
    from .kernel.iomem import render

    sys.stdout.write(render(_machine(args).tree, privileged=not args.unprivileged))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    """The memory map picture: MOUNTPOINT's memory-map.svg (its live state), or a machine built here."""
    from .memmap import MAP_FILE, render_svg

    if args.mountpoint is None:
        svg = render_svg(_machine(args)).encode()
    elif args.machine or args.iomem or args.set:
        raise MachineError("map: give MOUNTPOINT or --machine/--iomem/--set, not both")
    else:
        path = os.path.join(args.mountpoint, MAP_FILE)
        try:
            with open(path, "rb") as f:
                svg = f.read()
        except OSError as e:
            print(f"memfs: {path}: {e.strerror}", file=sys.stderr)
            return 1
    if args.output.endswith(".png"):
        import subprocess

        try:
            done = subprocess.run(["rsvg-convert", "-f", "png", "-o", args.output], input=svg, capture_output=True)
        except FileNotFoundError:
            raise RuntimeError("writing PNG needs rsvg-convert (Debian: librsvg2-bin); "
                               "or write .svg and convert it elsewhere") from None
        if done.returncode:
            raise RuntimeError(f"rsvg-convert: {done.stderr.decode(errors='replace').strip()}")
    elif args.output == "-":
        sys.stdout.buffer.write(svg)
    else:
        with open(args.output, "wb") as f:
            f.write(svg)
    return 0


def _log_setup(args: argparse.Namespace) -> Callable[[], None]:
    """Logging for the daemon: its own file per mount by default, bounded in size."""
    def setup() -> None:
        handler: logging.Handler
        if args.foreground:
            handler = logging.StreamHandler()
        else:
            handler = logging.handlers.RotatingFileHandler(args.log or default_log(args.mountpoint),
                                                           maxBytes=LOG_BYTES, backupCount=1)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])

    return setup


def default_log(mountpoint: str) -> str:
    """Each mount logs to a file of its own, named after its mount point."""
    return os.path.join(tempfile.gettempdir(), "memfs" + os.path.abspath(mountpoint).replace("/", "-") + ".log")


def cmd_mount(args: argparse.Namespace) -> int:
    from .fuse import daemon

    backing = None
    if args.backing_dir:
        from .journal import Backing

        backing = Backing(args.backing_dir, args.mountpoint)
    machine = _machine(args, backing.stores if backing else None)
    if backing:
        print(f"memfs: {backing.attach(machine)}", file=sys.stderr)
    note = daemon.prepare_mountpoint(args.mountpoint)
    if note:
        print(f"memfs: {note}", file=sys.stderr)
    if args.foreground:
        _log_setup(args)()
        daemon.serve(machine, args.mountpoint, args.allow_other,
                     ready=lambda: print(f"memfs: serving {machine.name} at {args.mountpoint}", flush=True))
        return 0
    log = args.log or default_log(args.mountpoint)
    try:
        pid = daemon.start(machine, args.mountpoint, args.allow_other, _log_setup(args))
    except daemon.MountError as e:
        raise daemon.MountError(f"{e} (log: {log})") from None
    print(f"memfs: mounted {machine.name} at {args.mountpoint} (daemon pid {pid}, log {log})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from .fuse import daemon

    daemon.unmount(args.mountpoint, args.lazy)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    path = os.path.join(args.mountpoint, "control")
    command = " ".join(args.words) + "\n"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        print(f"memfs: {path}: {e.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "r+b", buffering=0) as f:
        try:
            f.write(command.encode())
            failed = None
        except OSError as e:
            failed = e
        f.seek(0)
        result = f.read().decode()
    if failed is not None:
        reason = result.strip() or f"error: {errno.errorcode.get(failed.errno or 0, failed.errno)}: {failed.strerror}"
        print(f"memfs: {' '.join(args.words)}: {reason}", file=sys.stderr)
        return 1
    sys.stdout.write(result)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .nsrun import run_in_namespace

    return run_in_namespace(args.mountpoint, args.command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memfs", description="A simulated /dev/mem and /proc/iomem over FUSE.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def machine_args(sp: argparse.ArgumentParser) -> None:
        src = sp.add_mutually_exclusive_group()
        src.add_argument("--machine", metavar="FILE", help="a TOML machine description")
        src.add_argument("--iomem", metavar="FILE", help="a captured /proc/iomem to serve")
        sp.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help=settings.help_text())

    m = sub.add_parser("mount", help="mount a machine (returns once the mount is ready)")
    m.add_argument("mountpoint")
    machine_args(m)
    m.add_argument("--allow-other", action="store_true", help="let other users use the mount")
    m.add_argument("--foreground", action="store_true", help="serve in this process")
    m.add_argument("--log", help="daemon log file (default: /tmp/memfs-MOUNTPOINT.log, one per mount)")
    m.add_argument("--backing-dir", metavar="DIR",
                   help="keep the machine in DIR so that it survives the daemon (even kill -9): memory in "
                        "MAP_SHARED files (as QEMU's memory-backend-file), device and driver state as a "
                        "journal of commands and sysfs stores, written before each is applied. Mounting "
                        "again with the same DIR and the same --machine/--iomem/--set resumes the machine "
                        "as it was; DIR of another machine, or in use by a live mount, is refused. Layout: "
                        "memfs/journal.py")
    m.add_argument("-v", "--verbose", action="store_true", help="log every mount and command")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount")
    u.add_argument("mountpoint")
    u.add_argument("--lazy", action="store_true", help="detach even if busy")
    u.set_defaults(func=cmd_umount)

    c = sub.add_parser("ctl", help="send a command to MOUNTPOINT/control and print the result")
    c.add_argument("mountpoint")
    c.add_argument("words", nargs="+")
    c.set_defaults(func=cmd_ctl)

    i = sub.add_parser("iomem", help="print what MOUNTPOINT/proc/iomem would show, without mounting")
    machine_args(i)
    i.add_argument("--unprivileged", action="store_true", help="as a reader without CAP_SYS_ADMIN")
    i.set_defaults(func=cmd_iomem)

    mp = sub.add_parser("map", help="draw the physical address space as SVG (or PNG, via rsvg-convert): "
                                    "MOUNTPOINT's live state, or a machine built here without mounting")
    mp.add_argument("mountpoint", nargs="?", help="a memfs mount (reads MOUNTPOINT/memory-map.svg)")
    machine_args(mp)
    mp.add_argument("-o", "--output", default="-", metavar="FILE", help="FILE.svg or FILE.png (default: SVG on stdout)")
    mp.set_defaults(func=cmd_map)

    r = sub.add_parser("run", help="run a command with MOUNTPOINT's dev/mem and proc/iomem bound over "
                                   "/dev/mem and /proc/iomem in a private mount namespace")
    r.add_argument("mountpoint")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except (MachineError, ValueError) as e:
        print(f"memfs: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"memfs: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
