"""Issue 10 item 8 through real mounts: `memfs mount --backing-dir` survives kill -9 of its daemon.

Plugged memory (sha256 of every System RAM range, read through dev/mem), proc/iomem, the
devices and the memory blocks come back byte for byte when the same mount is made again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import alive, memfs, wait_for

MIB = 1 << 20
BASE = 0x100000000
# Plugged virtio-mem memory is readable through dev/mem only under this policy (as test_mount_virtio_mem's).
RAM_MAPS = ["--set", "arch=arm64", "--set", "STRICT_DEVMEM=n", "--set", "memhp_default_state=online_movable"]
SETTINGS = {"arch": "arm64", "STRICT_DEVMEM": "n", "memhp_default_state": "online_movable"}
# Small, so that hashing all plugged memory through dev/mem is quick: 64 MiB of boot RAM, a 1 GiB device.
MACHINE = textwrap.dedent('''\
    name = "crashy"
    iomem_text = """
    00000000-00000fff : Reserved
    00001000-0009fbff : System RAM
    000f0000-000fffff : Reserved
      000f0000-000fffff : System ROM
    00100000-03ffffff : System RAM
    """
    [[virtio_mem]]
    addr = "0x100000000"
    region_size = "1G"
    requested_size = "128M"
    ''')


@pytest.fixture
def machine_args(tmp_path):
    toml = tmp_path / "crashy.toml"
    toml.write_text(MACHINE)
    return ["--machine", str(toml), *RAM_MAPS, "--backing-dir", str(tmp_path / "backing")]


def ram_ranges(iomem: str) -> list[tuple[int, int]]:
    """Every System RAM range of a proc/iomem text (boot RAM and what virtio-mem plugged), inclusive."""
    out = []
    for line in iomem.splitlines():
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : System RAM", line)
        if m:
            out.append((int(m[1], 16), int(m[2], 16)))
    return out


def hash_ranges(read, ranges) -> dict[str, str]:
    """sha256 of each range, read in 2 MiB pieces (a subblock): `read` gives None for a refused piece
    (unplugged memory inside a partly plugged memory block)."""
    sums = {}
    for start, end in ranges:
        h = hashlib.sha256()
        pos = start
        while pos <= end:
            n = min(2 * MIB - pos % (2 * MIB), end + 1 - pos)
            data = read(pos, n)
            assert data is None or len(data) == n, f"short read at {pos:#x}"
            h.update(b"<unplugged>" if data is None else data)
            pos += n
        sums[f"{start:x}-{end:x}"] = h.hexdigest()
    return sums


def _pread(fd: int, off: int, n: int) -> bytes | None:
    try:
        return os.pread(fd, n, off)
    except OSError as e:
        if e.errno != errno.EFAULT:
            raise
        return None


def snapshot(mnt) -> dict:
    """What the mount shows: proc/iomem, devices, memory blocks, and a hash of all plugged memory."""
    iomem = (mnt / "proc/iomem").read_text()
    sysfs = mnt / "sys/devices/system/memory"
    blocks = {name: (sysfs / name / "state").read_text() for name in sorted(os.listdir(sysfs))
              if name.startswith("memory")}
    fd = os.open(mnt / "dev/mem", os.O_RDONLY)
    try:
        sums = hash_ranges(lambda off, n: _pread(fd, off, n), ram_ranges(iomem))
    finally:
        os.close(fd)
    return {"iomem": iomem, "devices": (mnt / "memory-devices").read_text(), "blocks": blocks,
            "auto_online": (sysfs / "auto_online_blocks").read_text(), "memory": sums}


def poke(mnt, addr: int, data: bytes) -> None:
    fd = os.open(mnt / "dev/mem", os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, addr) == len(data)
    finally:
        os.close(fd)


def ctl(mnt, *words: str) -> str:
    done = memfs("ctl", str(mnt), *words)
    assert done.returncode == 0, done.stderr
    return done.stdout


def daemon_pid(mnt) -> int:
    done = subprocess.run(["pgrep", "-f", f"memfs mount {mnt} "], capture_output=True, text=True, timeout=10)
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 1, pids
    return pids[0]


def kill_daemon(mnt) -> None:
    """kill -9 the daemon serving `mnt`; its mount stays behind, dead (never touched here)."""
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid), 10), f"daemon {pid} still runs"


def remount(mnt, args) -> subprocess.CompletedProcess:
    """`memfs mount` again at the same (dead) mount point with the same options, as the fixture mounts."""
    done = memfs("mount", str(mnt), "--log", os.path.join(os.path.dirname(mnt), "memfs.log"), "--allow-other", *args)
    assert done.returncode == 0, done.stderr
    return done


def test_kill_9_loses_nothing(mount, machine_args, tmp_path):
    mnt = mount(*machine_args)
    poke(mnt, 0x200000, b"boot RAM survives " * 1000)
    poke(mnt, BASE + 0x1000, b"plugged memory survives " * 1000)
    ctl(mnt, "virtio0", "requested-size", "256M")
    poke(mnt, BASE + 0xC000000, b"a block plugged later " * 1000)
    poke(mnt, BASE + 0xFC00000, b"Z" * 4096)
    ctl(mnt, "virtio0", "unplug", "0x10fc00000", "2M")
    ctl(mnt, "virtio0", "plug", "0x10fc00000", "2M")
    poke(mnt, BASE + 0xFC00800, b"after the replug")
    (mnt / "sys/devices/system/memory/memory33/state").write_text("offline")
    (mnt / "sys/devices/system/memory/memory33/state").write_text("online_movable")
    ctl(mnt, "virtio0", "requested-size", "512M")
    ctl(mnt, "virtio0", "unplug", "0x110000000", "128M")   # a whole memory block: removed
    ctl(mnt, "virtio0", "requested-size", "384M")          # so that no driver run plugs it again
    (mnt / "sys/devices/system/memory/auto_online_blocks").write_text("online_kernel")
    before = snapshot(mnt)
    assert list(before["memory"])[2:] == ["100000000-10fffffff", "118000000-11fffffff"]
    assert before["auto_online"] == "online_kernel\n" and "memory34" not in before["blocks"]
    other = tmp_path / "other"
    other.mkdir()
    busy = memfs("mount", str(other), *machine_args)
    assert busy.returncode == 2 and f"in use by the memfs daemon serving {mnt}" in busy.stderr

    kill_daemon(mnt)
    done = remount(mnt, machine_args)
    assert "cleared a dead memfs mount" in done.stderr and "resumed machine crashy" in done.stderr
    assert snapshot(mnt) == before
    fd = os.open(mnt / "dev/mem", os.O_RDONLY)
    try:
        assert os.pread(fd, 18, 0x200000) == b"boot RAM survives "
        assert os.pread(fd, 4096, BASE + 0xFC00000) == bytes(2048) + b"after the replug" + bytes(2032)
        with pytest.raises(OSError) as e:   # still unplugged, still refused
            os.pread(fd, 16, BASE + 0x10000000)
        assert e.value.errno == errno.EFAULT
    finally:
        os.close(fd)

    # it goes on from there, and a clean unmount resumes as well
    ctl(mnt, "virtio0", "requested-size", "128M")
    after = snapshot(mnt)
    assert memfs("umount", str(mnt)).returncode == 0
    assert wait_for(lambda: memfs("mount", str(mnt), *machine_args).returncode == 0, 10)
    assert snapshot(mnt) == after


def test_another_machine_is_refused(mount, machine_args, tmp_path):
    mnt = mount(*machine_args)
    kill_daemon(mnt)
    done = memfs("mount", str(mnt), *machine_args, "--set", "iomem=relaxed")
    assert done.returncode == 2
    assert "holds machine 'crashy'" in done.stderr and "mount with the same machine" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    remount(mnt, machine_args)


WRITER = textwrap.dedent('''\
    import errno, json, os, sys
    commands, progress = json.loads(sys.argv[1]), sys.argv[2]
    fd = os.open(sys.argv[3], os.O_RDWR)
    with open(progress, "w") as out:
        for cmd in commands:
            try:
                os.write(fd, cmd.encode())
                out.write("ok\\n")
            except OSError as e:
                if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
                    break
                out.write(f"{errno.errorcode[e.errno]}\\n")   # a command that failed: answered
            out.flush()
    ''')


def stream() -> list[str]:
    """Resizes and explicit (un)plugs, some of which fail, forever changing the plugged set."""
    sizes = ["192M", "256M", "320M", "128M", "384M", "224M"]
    out = []
    for i in range(600):
        out.append(f"virtio0 requested-size {sizes[i % len(sizes)]}")
        addr = BASE + 0x8000000 + (i * 7 % 64) * 2 * MIB
        out.append(f"virtio0 {'unplug' if i % 2 else 'plug'} {addr:#x} 2M")
    return out


def model_snapshot(commands: list[str], pokes) -> dict:
    """What the mount must show after `commands`: the same inputs on the model, hashed the same way."""
    from memfs.control import Control, ControlError
    from memfs.kernel.iomem import render
    from memfs.kernel.mem import AccessError
    from memfs.loader import load_machine
    from memfs.status import memory_devices

    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(MACHINE)
        f.flush()
        m = load_machine(f.name, settings=SETTINGS)
    for addr, data in pokes:
        m.bus.store(addr, data)
    for cmd in commands:
        try:
            Control(m).execute(cmd.encode())
        except ControlError:
            pass
    def read(off: int, n: int) -> bytes | None:
        try:
            return m.devmem.read_mem(off, n)
        except AccessError as e:
            assert e.errno == errno.EFAULT
            return None

    iomem = render(m.tree, True)
    return {"iomem": iomem, "devices": memory_devices(m), "memory": hash_ranges(read, ram_ranges(iomem))}


def test_kill_9_in_a_stream_of_commands(mount, machine_args, tmp_path):
    mnt = mount(*machine_args)
    pokes = [(0x300000, b"boot RAM " * 500), (BASE + 0x2000, b"never unplugged " * 500)]
    for addr, data in pokes:
        poke(mnt, addr, data)
    commands = stream()
    progress = tmp_path / "progress"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(commands), str(progress), str(mnt / "control")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: progress.exists() and len(progress.read_text().splitlines()) >= 40, 60)
        kill_daemon(mnt)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    answered = len(progress.read_text().splitlines())
    assert 40 <= answered < len(commands)
    done = remount(mnt, machine_args)
    assert "resumed machine crashy" in done.stderr
    got = snapshot(mnt)
    # the command in flight when the daemon died may or may not have been journaled
    candidates = [model_snapshot(commands[:n], pokes) for n in (answered, answered + 1)]
    assert {k: got[k] for k in ("iomem", "devices", "memory")} in candidates
    journal = (tmp_path / "backing/journal").read_text().splitlines()
    assert len(journal) < answered   # cycles and failures were compacted away
