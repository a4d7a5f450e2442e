"""Issue 3 acceptance through real mounts: dev/mem with the kernel's rules, by dd, pread/pwrite, mmap, busybox."""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from conftest import QEMU_Q35_2G, as_nobody, memfs

BOOT_ONLY = str(QEMU_Q35_2G)  # no hot-added memory
PAGE = 4096


def _on_fresh_open(path, fn, *args):
    fd = os.open(path, os.O_RDWR)
    try:
        return fn(fd, *args)
    finally:
        os.close(fd)


def pread(path, size, offset):
    return _on_fresh_open(path, os.pread, size, offset)


def pwrite(path, data, offset):
    return _on_fresh_open(path, os.pwrite, data, offset)


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return e.value.errno


MAP_PROBE = textwrap.dedent("""
    import mmap, os, sys
    path, addr, length, action = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0), sys.argv[4]
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=addr)
    if action.startswith("write:"):
        m[:len(action) - 6] = action[6:].encode()
    sys.stdout.write(m[:length].hex())
""")


def map_probe(path, addr, length=PAGE, action="read", **kw) -> subprocess.CompletedProcess:
    """Touch a MAP_SHARED mapping of an O_SYNC open in a child; a refused page kills it with SIGBUS."""
    return subprocess.run([sys.executable, "-c", MAP_PROBE, str(path), hex(addr), str(length), action],
                          capture_output=True, text=True, timeout=60, **kw)


def busybox_devmem(mnt, *args) -> subprocess.CompletedProcess:
    return memfs("run", str(mnt), "--", "busybox", "devmem", *args)


@pytest.fixture(scope="module")
def boot_mnt():
    """The observed q35 machine without hot-added memory: high_memory is 0x7ffe0000."""
    from conftest import Mounts

    m = Mounts()
    try:
        yield m("--iomem", BOOT_ONLY)
    finally:
        m.cleanup()


def test_bios_area_reads_and_ram_is_refused_with_dd(boot_mnt):
    mem = boot_mnt / "dev/mem"
    ok = subprocess.run(["dd", f"if={mem}", "bs=4096", "skip=240", "count=16", "status=none"], capture_output=True)
    assert ok.returncode == 0 and len(ok.stdout) == 16 * PAGE
    assert ok.stdout != bytes(16 * PAGE)  # ROM has content
    refused = subprocess.run(["dd", f"if={mem}", "bs=4096", "skip=256", "count=1", "status=none"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr


def test_read_rules_of_read_mem(boot_mnt):
    mem = boot_mnt / "dev/mem"
    assert errno_of(pread, mem, 8192, 0xFF000) == errno.EPERM  # ROM page then RAM: whole call fails
    assert pread(mem, PAGE, 0x1000) == bytes(PAGE)  # low-MiB RAM reads as zeros
    assert pread(mem, PAGE, 0x9F000) == bytes(PAGE)  # partly RAM counts as RAM
    for addr in (0x7FFE0000, 0xFFFFF000, 0xFD000000, 0xFE000000, 0x100000000):
        assert errno_of(pread, mem, PAGE, addr) == errno.EFAULT, hex(addr)  # beyond high_memory
    assert errno_of(pread, mem, 2 * PAGE, 0x7FFDF000) == errno.EFAULT  # the end counts, checked first


def test_mmap_follows_page_policy_above_high_memory(boot_mnt):
    mem = boot_mnt / "dev/mem"
    free_bar = map_probe(mem, 0xFD000000)
    assert free_bar.returncode == 0, free_bar.stderr
    assert bytes.fromhex(free_bar.stdout) == bytes(PAGE)
    claimed_bar = map_probe(mem, 0xFE000000)  # virtio-pci-modern: busy, IO_STRICT_DEVMEM
    assert claimed_bar.returncode == -7  # SIGBUS
    rom = map_probe(mem, 0xFFFFF000)
    assert rom.returncode == 0 and bytes.fromhex(rom.stdout) != bytes(PAGE)


def test_refused_page_never_reaches_the_caller_in_page_cache_mode(boot_mnt):
    mem = boot_mnt / "dev/mem"
    fd = os.open(mem, os.O_RDONLY | os.O_SYNC)
    try:
        try:
            got = os.pread(fd, 8192, 0xFF000)
        except OSError as e:
            assert e.errno == errno.EPERM
        else:  # the page cache may serve the allowed page alone
            assert got == pread(mem, PAGE, 0xFF000)
        assert errno_of(os.pread, fd, PAGE, 0x100000) == errno.EPERM
    finally:
        os.close(fd)


def test_busybox_devmem(boot_mnt):
    dd = subprocess.run(["dd", f"if={boot_mnt / 'dev/mem'}", "bs=4", "skip=%d" % (0xF0000 // 4), "count=1",
                         "status=none"], capture_output=True, check=True)
    word = struct.unpack("<I", dd.stdout)[0]
    shown = busybox_devmem(boot_mnt, "0xF0000")
    assert shown.returncode == 0, shown.stderr
    assert int(shown.stdout, 16) == word
    ram = busybox_devmem(boot_mnt, "0x100000")
    assert ram.returncode == 128 + 7 and "SIGBUS" in ram.stderr, (ram.returncode, ram.stderr)
    written = busybox_devmem(boot_mnt, "0xFD000010", "32", "0x12345678")
    assert written.returncode == 0, written.stderr
    back = busybox_devmem(boot_mnt, "0xFD000010")
    assert int(back.stdout, 16) == 0x12345678


def test_write_stores_pages_before_the_refused_one(mount):
    mnt = mount()  # default machine: hot-added memory raised high_memory above the PCI hole
    mem = mnt / "dev/mem"
    marker = b"A" * PAGE + b"B" * PAGE
    assert errno_of(pwrite, mem, marker, 0xFDFFF000) == errno.EPERM  # 0xfe000000 is virtio-pci-modern
    assert pread(mem, PAGE, 0xFDFFF000) == b"A" * PAGE
    assert pwrite(mem, b"zz", 0x2000) == 2  # low-MiB RAM swallows writes...
    assert pread(mem, 2, 0x2000) == b"\0\0"  # ...and reads zeros
    audit = (mnt / "audit").read_text()
    assert "virtio-pci-modern" in audit and "pid=" in audit and "EPERM" in audit


def test_strict_devmem_off_lets_ram_through_read_and_write(mount):
    mnt = mount("--iomem", BOOT_ONLY, "--set", "STRICT_DEVMEM=n")
    mem = mnt / "dev/mem"
    assert pwrite(mem, b"hello memfs", 0x1234567) == 11
    assert pread(mem, 11, 0x1234567) == b"hello memfs"  # a new open still sees it
    dd = subprocess.run(["dd", f"if={mem}", "bs=1", "skip=%d" % 0x1234567, "count=11", "status=none"],
                        capture_output=True, check=True)
    assert dd.stdout == b"hello memfs"
    assert map_probe(mem, 0x1234000).returncode == -7  # x86 PAT: RAM never maps (phys_mem_access_prot_allowed)
    assert pread(mem, 4, 0x2000) == b"\0\0\0\0"  # untouched RAM is zero


def test_arm64_without_strict_devmem_maps_ram(mount):
    mnt = mount("--iomem", BOOT_ONLY, "--set", "arch=arm64", "--set", "STRICT_DEVMEM=n")
    mem = mnt / "dev/mem"
    done = map_probe(mem, 0x2000000, action="write:pattern")
    assert done.returncode == 0, done.stderr
    assert pread(mem, 7, 0x2000000) == b"pattern"


def test_unprivileged_user_is_refused(default_mnt):
    done = as_nobody("dd", f"if={default_mnt / 'dev/mem'}", "bs=4096", "count=1", "status=none")
    assert done.returncode != 0 and b"Permission denied" in done.stderr
    st = (default_mnt / "dev/mem").stat()
    assert oct(st.st_mode & 0o777) == "0o600" and st.st_uid == 0


def test_lseek_and_size(default_mnt):
    mem = default_mnt / "dev/mem"
    assert mem.stat().st_size == 1 << 40  # the q35 machine's 40 physical address bits
    fd = os.open(mem, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0xF0000, os.SEEK_SET) == 0xF0000
        assert os.lseek(fd, 16, os.SEEK_CUR) == 0xF0010
        assert os.read(fd, 4) == pread(mem, 4, 0xF0010)
        assert os.lseek(fd, (1 << 62) + 5, os.SEEK_SET) == (1 << 62) + 5
    finally:
        os.close(fd)


def test_refused_read_leaves_file_position(default_mnt):
    fd = os.open(default_mnt / "dev/mem", os.O_RDONLY)
    try:
        os.lseek(fd, 0x100000, os.SEEK_SET)
        assert errno_of(os.read, fd, PAGE) == errno.EPERM
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0x100000
    finally:
        os.close(fd)


def test_one_tib_machine_mounts_small(mount, tmp_path):
    toml = tmp_path / "big.toml"
    toml.write_text('phys_bits = 41\n[[resource]]\nrange = "0x1000-0x9fbff"\nname = "System RAM"\n'
                    'flags = "SYSTEM_RAM|BUSY"\n[[resource]]\nrange = "0x100000-0x100ffffffff"\n'
                    'name = "System RAM"\nflags = "SYSTEM_RAM|BUSY"\n')
    mnt = mount("--machine", str(toml), "--set", "STRICT_DEVMEM=n")
    mem = mnt / "dev/mem"
    assert pwrite(mem, b"top", 0x100FFFFF000) == 3
    assert pread(mem, 3, 0x100FFFFF000) == b"top"
    pid = int(subprocess.run(["pgrep", "-f", f"memfs mount {mnt} "], capture_output=True, text=True).stdout)
    rss_kib = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1])
    assert rss_kib < 100 * 1024, rss_kib
