"""Issue 2 acceptance through real mounts: proc/iomem, the CLI, errors, daemon life cycle."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import DUMPS, QEMU_Q35_2G, alive, as_nobody, memfs, mounted, wait_for

DEFAULT_IOMEM = QEMU_Q35_2G.read_text()
VIRTIO_LINES = "100000000-1ffffffff : virtio0\n  100000000-13fffffff : System RAM (virtio_mem)\n"


def zeroed(text: str) -> str:
    return re.sub(r"^( *)[0-9a-f]+-[0-9a-f]+ : ", r"\g<1>00000000-00000000 : ", text, flags=re.M)


def default_with_virtio() -> str:
    """The observed q35 layout with the device's two lines in place (issue 4): after fffc0000-ffffffff."""
    anchor = "fffc0000-ffffffff : Reserved\n"
    assert anchor in DEFAULT_IOMEM
    return DEFAULT_IOMEM.replace(anchor, anchor + VIRTIO_LINES)


def daemon_pid(mnt: Path) -> int:
    out = subprocess.run(["pgrep", "-f", f"memfs mount {mnt} "], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def test_default_machine_iomem_as_root_and_nobody(default_mnt):
    root = subprocess.run(["cat", default_mnt / "proc/iomem"], capture_output=True, text=True, check=True).stdout
    assert root == default_with_virtio()
    nobody = as_nobody("cat", str(default_mnt / "proc/iomem"))
    assert nobody.returncode == 0, nobody.stderr
    assert nobody.stdout.decode() == zeroed(default_with_virtio())


def test_observed_layout_exactly_with_iomem_option(mount):
    mnt = mount("--iomem", str(QEMU_Q35_2G))
    assert (mnt / "proc/iomem").read_text() == DEFAULT_IOMEM


def test_proc_iomem_is_procfs_like_and_reads_in_any_chunk_size(default_mnt):
    path = default_mnt / "proc/iomem"
    st = path.stat()
    assert st.st_size == 0 and oct(st.st_mode & 0o777) == "0o444"
    whole = path.read_bytes()
    for bs in (1, 7, 64, 4096, 1 << 20):
        fd = os.open(path, os.O_RDONLY)
        try:
            parts = []
            while chunk := os.read(fd, bs):
                parts.append(chunk)
        finally:
            os.close(fd)
        assert b"".join(parts) == whole, bs
    dd = subprocess.run(["dd", f"if={path}", "bs=13", "status=none"], capture_output=True, check=True)
    assert dd.stdout == whole


@pytest.mark.parametrize("dump", DUMPS, ids=lambda p: p.name)
def test_memfs_iomem_reproduces_every_dump(dump):
    done = memfs("iomem", "--iomem", str(dump))
    assert done.returncode == 0, done.stderr
    assert done.stdout == dump.read_text()


def test_mounted_dumps_reproduce_byte_for_byte(mount):
    for dump in DUMPS:
        mnt = mount("--iomem", str(dump))
        assert (mnt / "proc/iomem").read_bytes() == dump.read_bytes(), dump.name
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_snapshot_per_open_survives_changes(mount):
    mnt = mount()
    fd = os.open(mnt / "proc/iomem", os.O_RDONLY)
    try:
        head = os.read(fd, 100)
        done = memfs("ctl", str(mnt), "virtio0", "requested-size", "0")
        assert done.returncode == 0, done.stderr
        rest = b""
        while chunk := os.read(fd, 100):
            rest += chunk
    finally:
        os.close(fd)
    assert (head + rest).decode() == default_with_virtio()  # the old view, whole
    # ZONE_NORMAL keeps the block holding unmovable kernel pages, as a real guest does
    assert (mnt / "proc/iomem").read_text() == DEFAULT_IOMEM.replace(
        "fffc0000-ffffffff : Reserved\n", "fffc0000-ffffffff : Reserved\n100000000-1ffffffff : virtio0\n"
        "  100000000-107ffffff : System RAM (virtio_mem)\n")


def test_without_allow_other_other_users_cannot_open(mount):
    mnt = mount(allow_other=False)
    assert as_nobody("cat", str(mnt / "proc/iomem")).returncode != 0
    assert (mnt / "proc/iomem").read_text() == default_with_virtio()


@pytest.mark.parametrize("args,needle", [
    (["--iomem", "BAD"], "line 2"),
    (["--machine", "OVERLAP"], "conflicts with"),
    (["--set", "NOPE=1"], "unknown setting 'NOPE'"),
    (["--set", "STRICT_DEVMEM=n", "--set", "EXCLUSIVE_SYSTEM_RAM=y"], "depends on !DEVMEM || STRICT_DEVMEM"),
])
def test_bad_input_is_a_one_line_error_and_mounts_nothing(tmp_path, args, needle):
    bad = tmp_path / "bad.iomem"
    bad.write_text("00000000-00000fff : Reserved\n00001000-0009fbff System RAM\n")
    overlap = tmp_path / "overlap.toml"
    overlap.write_text('[[resource]]\nrange = "0x1000-0x1fff"\nname = "a"\n'
                       '[[resource]]\nrange = "0x1800-0x27ff"\nname = "b"\n')
    args = [str(bad) if a == "BAD" else str(overlap) if a == "OVERLAP" else a for a in args]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for cmd in (["mount", str(mnt), *args], ["iomem", *args]):
        done = memfs(*cmd)
        assert done.returncode != 0
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert needle in done.stderr
        assert not mounted(mnt)


def test_sigterm_unmounts_cleanly(mount):
    mnt = mount()
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGTERM)
    # the daemon unmounts, then finishes its exit (it may sit in state D for a moment): poll both
    assert wait_for(lambda: not mounted(mnt) and not alive(pid), 10), (mounted(mnt), alive(pid))


def test_mount_recovers_from_a_killed_daemon(mount):
    mnt = mount()
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid), 10)
    with pytest.raises(OSError) as e:
        os.stat(mnt / "proc")  # the daemon is dead, so the kernel answers at once
    assert "Transport endpoint is not connected" in str(e.value)
    done = memfs("mount", str(mnt), "--allow-other")
    assert done.returncode == 0, done.stderr
    assert "cleared a dead memfs mount" in done.stderr
    assert (mnt / "proc/iomem").read_text() == default_with_virtio()


def test_run_binds_the_mount_over_the_real_paths(default_mnt):
    host_dev = sorted(os.listdir("/dev"))
    done = memfs("run", str(default_mnt), "--", "cat", "/proc/iomem")
    assert done.returncode == 0, done.stderr
    assert done.stdout == default_with_virtio()
    assert Path("/proc/iomem").read_text() != done.stdout  # the host's view is untouched
    assert sorted(os.listdir("/dev")) == host_dev


def test_umount(mount):
    mnt = mount()
    assert memfs("umount", str(mnt)).returncode == 0
    assert not mounted(mnt)
    again = memfs("umount", str(mnt))
    assert again.returncode == 1 and "nothing is mounted there" in again.stderr
