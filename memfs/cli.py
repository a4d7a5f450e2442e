"""memfs command line: mount | umount | ctl | iomem | run. Parsing and plumbing only."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import subprocess
import sys
import tempfile

from .loader import MachineError, load_machine


def _settings(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MachineError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _machine(args: argparse.Namespace):
    return load_machine(args.machine, args.iomem, _settings(args.set))


def cmd_iomem(args: argparse.Namespace) -> int:
    from .kernel.iomem import render

    sys.stdout.write(render(_machine(args).tree, privileged=not args.unprivileged))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from .fuse.daemon import prepare_mountpoint, serve

    machine = _machine(args)
    note = prepare_mountpoint(args.mountpoint)
    if note:
        print(f"memfs: {note}", file=sys.stderr)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        filename=None if args.foreground else args.log)
    if args.foreground:
        serve(machine, args.mountpoint, args.allow_other,
              ready=lambda: print(f"memfs: serving {machine.name} at {args.mountpoint}", flush=True))
        return 0
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
            serve(machine, args.mountpoint, args.allow_other, ready=lambda: os.write(write_end, b"ready\n"))
            status = 0
        except BaseException as e:  # report why the mount failed to the waiting parent
            os.write(write_end, f"error {e}\n".encode())
            logging.exception("daemon failed")
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.readline().strip()
    if answer != "ready":
        print(f"memfs: mount failed: {answer.removeprefix('error ') or 'daemon exited'} (log: {args.log})",
              file=sys.stderr)
        return 1
    print(f"memfs: mounted {machine.name} at {args.mountpoint} (daemon pid {pid}, log {args.log})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    # /proc/self/mounts, not os.path.ismount(): a dead daemon's mount cannot be stat()ed
    target = os.path.abspath(args.mountpoint).replace(" ", "\\040")
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1] == target for line in f)
    if not mounted:
        print(f"memfs: umount {args.mountpoint}: nothing is mounted there", file=sys.stderr)
        return 1
    done = subprocess.run(["fusermount3", "-u"] + (["-z"] if args.lazy else []) + [args.mountpoint],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memfs: umount {args.mountpoint}: {done.stderr.strip()}"
              + ("" if args.lazy else f" (a busy mount can be detached with: memfs umount --lazy {args.mountpoint})"),
              file=sys.stderr)
        return 1
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
        reason = result.strip() or f"error: {errno.errorcode.get(failed.errno, failed.errno)}: {failed.strerror}"
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
                        help="arch=x86_64|arm64, STRICT_DEVMEM=y|n, IO_STRICT_DEVMEM=y|n, "
                             "EXCLUSIVE_SYSTEM_RAM=y|n, iomem=strict|relaxed, region_intersects=descend|toplevel, "
                             "memhp_default_state=offline|online|online_kernel|online_movable")

    m = sub.add_parser("mount", help="mount a machine (returns once the mount is ready)")
    m.add_argument("mountpoint")
    machine_args(m)
    m.add_argument("--allow-other", action="store_true", help="let other users use the mount")
    m.add_argument("--foreground", action="store_true", help="serve in this process")
    m.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "memfs.log"), help="daemon log file")
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

    r = sub.add_parser("run", help="run a command with MOUNTPOINT's dev/mem and proc/iomem bound over "
                                   "/dev/mem and /proc/iomem in a private mount namespace")
    r.add_argument("mountpoint")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MachineError, ValueError) as e:
        print(f"memfs: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"memfs: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
