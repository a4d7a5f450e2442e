"""Issue 4 acceptance through real mounts: virtio-mem control, status files, policy, revocation."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import QEMU_Q35_2G, memfs, two_devices
from test_mount_devmem import errno_of, map_probe, pread, pwrite

DEFAULT_IOMEM = QEMU_Q35_2G.read_text()
ANCHOR = "fffc0000-ffffffff : Reserved\n"
MIB, GIB = 1 << 20, 1 << 30
BLOCK = 128 * MIB
BASE = 0x100000000
BOOT_BLOCKS = set(range(16))  # 0x0-0x7fffffff holds boot RAM: memory0..memory15
HAZARD = ["--set", "arch=arm64", "--set", "EXCLUSIVE_SYSTEM_RAM=n"]
RAM_MAPS = ["--set", "arch=arm64", "--set", "STRICT_DEVMEM=n", "--set", "memhp_default_state=online_movable"]


def expected_iomem(*children: tuple[int, int]) -> str:
    """The q35 layout with virtio0 and its System RAM (virtio_mem) children, built from the spec's format."""
    lines = f"{BASE:08x}-{BASE + 4 * GIB - 1:08x} : virtio0\n"
    lines += "".join(f"  {s:08x}-{e:08x} : System RAM (virtio_mem)\n" for s, e in children)
    return DEFAULT_IOMEM.replace(ANCHOR, ANCHOR + lines)


def blocks(mnt) -> set[int]:
    names = os.listdir(mnt / "sys/devices/system/memory")
    return {int(n[6:]) for n in names if n.startswith("memory")}


def ctl(mnt, *words, ok=True) -> subprocess.CompletedProcess:
    done = memfs("ctl", str(mnt), *words)
    assert (done.returncode == 0) == ok, (done.stdout, done.stderr)
    return done


def test_boot_state_and_status_files(default_mnt):
    assert (default_mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + GIB - 1))
    info = (default_mnt / "memory-devices").read_text().splitlines()
    assert info[0] == 'Memory device [virtio-mem]: "virtio0"'
    fields = dict(line.strip().split(": ", 1) for line in info[1:])
    assert fields == {"memaddr": "0x100000000", "node": "0", "requested-size": str(GIB), "size": str(GIB),
                      "max-size": str(4 * GIB), "block-size": str(2 * MIB), "memdev": "/objects/mem0"}
    sysfs = default_mnt / "sys/devices/system/memory"
    assert (sysfs / "block_size_bytes").read_text() == "8000000\n"
    assert blocks(default_mnt) == BOOT_BLOCKS | set(range(32, 40))
    # the default machine onlines what it hot-adds, as its reference guest does
    assert (sysfs / "auto_online_blocks").read_text() == "online\n"
    m32 = sysfs / "memory32"
    assert [(m32 / f).read_text() for f in ("phys_index", "state", "online", "valid_zones", "removable")] == [
        "00000020\n", "online\n", "1\n", "Normal\n", "1\n"]
    assert (sysfs / "memory0/valid_zones").read_text() == "none\n"  # spans DMA and DMA32
    assert [(sysfs / "memory15" / f).read_text() for f in ("state", "valid_zones")] == ["online\n", "DMA32\n"]


def test_requested_size_sequence_matches_linux(mount):
    """3G, 512M, 514M on the default machine: derived from spec 6.3-6.7 (SBM, 64 x 2 MiB subblocks a block).

    Added blocks stay offline (Debian 12's 6.1 kernel), and a new block may only be added while
    offline memory + 128 MiB <= offline_threshold = max(2 x 128 MiB, 1 GiB). The 1 GiB plugged at
    boot is already 1 GiB offline, so 3G stops at once with ENOSPC and nothing changes.
    512M: unplug 512 MiB from OFFLINE blocks, highest first: 39..36 are removed, 32..35 stay.
    514M: 2 MiB = one subblock; no partial block exists; UNUSED block 36 (removed before) is taken
    first, plugged with subblock 0 and added whole: the resource grows by 128 MiB.
    """
    mnt = mount("--set", "memhp_default_state=offline")
    done = ctl(mnt, "virtio0", "requested-size", "3G")
    assert done.stdout.startswith("partial:") and "ENOSPC" in done.stdout
    assert (mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + GIB - 1))
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 40))
    ctl(mnt, "virtio0", "requested-size", "512M")
    assert (mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + 512 * MIB - 1))
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 36))
    done = ctl(mnt, "virtio0", "requested-size", "514M")
    assert done.stdout.startswith("ok:")
    assert (mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + 5 * BLOCK - 1))
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 37))
    assert (mnt / "memory-devices").read_text().count(f"size: {514 * MIB}\n") == 2  # requested and plugged


def test_requested_size_sequence_with_memory_onlined_movable(mount):
    """The same with memhp_default_state=online_movable (spec 6.10's sequence): no threshold applies,
    and ZONE_MOVABLE holds no unmovable pages, so everything the driver asks for goes.

    3G: usable region min(4G, 3G+256M); 2G more = 16 new blocks 40..55 after 32..39, merged.
    512M: KERNEL blocks highest first: 55..36 go whole, 32..35 stay.
    514M: one subblock into a new block 36, added whole (KERNEL_PARTIAL).
    """
    mnt = mount("--set", "memhp_default_state=online_movable")
    assert (mnt / "sys/devices/system/memory/memory32/state").read_text() == "online\n"
    assert (mnt / "sys/devices/system/memory/memory32/valid_zones").read_text() == "Movable\n"
    ctl(mnt, "virtio0", "requested-size", "3G")
    assert (mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + 3 * GIB - 1))
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 56))
    ctl(mnt, "virtio0", "requested-size", "512M")
    assert (mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + 512 * MIB - 1))
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 36))
    ctl(mnt, "virtio0", "requested-size", "514M")
    assert (mnt / "proc/iomem").read_text() == expected_iomem((BASE, BASE + 5 * BLOCK - 1))
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 37))


def test_default_policy_refuses_every_page_of_the_region(default_mnt):
    mem = default_mnt / "dev/mem"
    assert errno_of(pread, mem, 4096, BASE) == errno.EPERM  # plugged, below high_memory
    assert errno_of(pwrite, mem, b"x", BASE + 0x1000) == errno.EPERM
    assert errno_of(pread, mem, 4096, BASE + 2 * GIB) == errno.EFAULT  # above high_memory: checked first
    for addr in (BASE, BASE + GIB - 4096, BASE + GIB, BASE + 4 * GIB - 4096):
        assert map_probe(mem, addr).returncode == -7, hex(addr)  # SIGBUS
    audit = (default_mnt / "audit").read_text()
    assert "iomem_is_exclusive: virtio0 (SYSTEM_RAM|EXCLUSIVE)" in audit
    assert "read 0, write 0" in audit  # nothing reached the device


def test_pre_5_16_arm64_mapping_reaches_unplugged_memory(mount):
    """The hazard of the 5.16 commit: outside added blocks the region is neither RAM nor exclusive."""
    hazard = mount(*HAZARD)
    unplugged = BASE + 2 * GIB
    assert map_probe(hazard / "dev/mem", unplugged).returncode == -7  # the device refuses: SIGBUS
    assert map_probe(hazard / "dev/mem", BASE).returncode == -7  # added memory: the kernel refuses
    audit = (hazard / "audit").read_text()
    # the page cache may ask again before giving up with SIGBUS: count the touched page's reads
    reads = [line for line in audit.splitlines() if "guest read of unplugged" in line]
    assert reads and all(f"[{unplugged:#x}-{unplugged + 0xfff:#x}]" in line for line in reads)
    assert f"read {len(reads)}, write 0" in audit
    # the same steps on the default policy: refused by the kernel, nothing reaches the device
    safe = mount()
    assert map_probe(safe / "dev/mem", unplugged).returncode == -7
    assert "read 0, write 0" in (safe / "audit").read_text()


HOLDER = textwrap.dedent("""
    import ctypes, mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_SYNC)
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=int(sys.argv[2], 0))
    m[:8] = b"PATTERN!"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(hex(addr), flush=True)
    for line in sys.stdin:
        if line.startswith("store "):
            m[:8] = line.split()[1].encode()
        print(m[:8].hex(), flush=True)
""")


def test_unplug_revokes_mappings_and_replug_reads_zeros(mount):
    """Stores through a live mapping land before an unplug discards the memory; afterwards the
    mapping is revoked (SIGBUS, gdb cannot read it) and re-plugged memory reads as zeros.

    dev/mem is opened before the mapping exists and never again until the unplug: a fresh FUSE
    open drops cached pages by itself and would hide a missing invalidation.
    """
    mnt = mount(*RAM_MAPS)
    mem = mnt / "dev/mem"
    plain = os.open(mem, os.O_RDWR)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(mem), hex(BASE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def holder_says(line: str) -> bytes:
        holder.stdin.write(line + "\n")
        holder.stdin.flush()
        return bytes.fromhex(holder.stdout.readline().strip())

    try:
        addr = holder.stdout.readline().strip()
        assert holder_says("touch") == b"PATTERN!"
        assert os.pread(plain, 8, BASE) == b"PATTERN!"  # a plain read sees what the mapping stored
        assert holder_says("store SECOND!!") == b"SECOND!!"  # dirty again, not yet written back
        ctl(mnt, "virtio0", "unplug", hex(BASE), "2M")
        assert "read 0, write 0" in (mnt / "audit").read_text()  # the store landed before the discard
        gdb = subprocess.run(["gdb", "-p", str(holder.pid), "-batch", "-nx", "-ex", f"x/8xb {addr}"],
                             capture_output=True, text=True, timeout=120)
        assert f"Cannot access memory at address {addr}" in gdb.stdout + gdb.stderr, gdb.stdout + gdb.stderr
        holder.stdin.write("touch\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == -7  # SIGBUS on the next touch
    finally:
        holder.kill()
        holder.wait()
        os.close(plain)
    assert errno_of(pread, mem, 8, BASE) == errno.EFAULT  # unplugged: the device refuses
    ctl(mnt, "virtio0", "plug", hex(BASE), "2M")
    assert pread(mem, 8, BASE) == bytes(8)  # re-plugged memory was discarded
    again = map_probe(mem, BASE)
    assert again.returncode == 0 and bytes.fromhex(again.stdout) == bytes(4096)


def rss_kib(mnt) -> int:
    pid = int(subprocess.run(["pgrep", "-f", f"memfs mount {mnt} "], capture_output=True, text=True).stdout)
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1])


def test_unplug_gives_memory_back(mount):
    mnt = mount(*RAM_MAPS)
    fd = os.open(mnt / "dev/mem", os.O_RDWR)
    try:
        chunk = b"\xa5" * MIB
        for i in range(256):
            os.pwrite(fd, chunk, BASE + i * MIB)
    finally:
        os.close(fd)
    full = rss_kib(mnt)
    ctl(mnt, "virtio0", "unplug", hex(BASE), "256M")
    time.sleep(0.1)
    assert full - rss_kib(mnt) > 200 * 1024, (full, rss_kib(mnt))


def test_bad_commands_change_nothing(mount):
    mnt = mount(*RAM_MAPS)
    pwrite(mnt / "dev/mem", b"keep me", BASE + 5 * MIB)

    def state():
        sysfs = mnt / "sys/devices/system/memory"
        return ((mnt / "proc/iomem").read_text(), (mnt / "memory-devices").read_text(),
                {b: (sysfs / f"memory{b}" / "state").read_text() for b in blocks(mnt)},
                pread(mnt / "dev/mem", 7, BASE + 5 * MIB))

    before = state()
    cases = [
        (["virtio0", "plug", "0x100000001", "2M"], "EINVAL"),  # misaligned
        (["virtio0", "plug", hex(BASE), "3M"], "EINVAL"),  # not whole subblocks
        (["virtio9", "plug", hex(BASE), "2M"], "ENODEV"),
        (["virtio0", "unplug", "0x300000000", "2M"], "ERANGE"),  # outside the region
        (["virtio0", "plug", hex(BASE), "2M"], "EBUSY"),  # already plugged
        (["virtio0", "plug", hex(BASE + GIB - 2 * MIB), "4M"], "EBUSY"),  # runs into plugged memory
        (["virtio0", "requested-size", "5G"], "EINVAL"),  # above the region
        (["virtio0", "requested-size", "1M"], "EINVAL"),  # not a block multiple
        (["virtio0", "requested-size", "lots"], "EINVAL"),
        (["virtio0", "explode"], "EINVAL"),
        ([""], "EINVAL"),
    ]
    for words, err in cases:
        done = ctl(mnt, *words, ok=False)
        assert err in done.stderr, (words, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
        assert state() == before, words


def test_two_devices_never_merge(mount, tmp_path):
    mnt = mount("--machine", str(two_devices(tmp_path, 'requested_size = "256M"', 'requested_size = "128M"\nnode = 1')))
    text = (mnt / "proc/iomem").read_text()
    assert ANCHOR + ("100000000-13fffffff : virtio0\n  100000000-10fffffff : System RAM (virtio_mem)\n"
                     "140000000-17fffffff : virtio1\n  140000000-147ffffff : System RAM (virtio_mem)\n") in text
    info = (mnt / "memory-devices").read_text()
    assert '"virtio0"' in info and '"virtio1"' in info and "  node: 1\n" in info
    ctl(mnt, "virtio1", "requested-size", "0")
    assert "140000000-17fffffff : virtio1\n340000000" in (mnt / "proc/iomem").read_text()
    assert blocks(mnt) == BOOT_BLOCKS | {32, 33}


def test_onlining_memory_lets_the_driver_go_on(mount):
    """Onlining memory requeues the driver once offline memory is at most half the threshold
    (spec 6.5): each time it adds blocks until 1 GiB is offline again (spec 6.6)."""
    mnt = mount("--set", "memhp_default_state=offline")
    sysfs = mnt / "sys/devices/system/memory"
    assert "ENOSPC" in ctl(mnt, "virtio0", "requested-size", "3G").stdout
    for b in range(32, 40):
        (sysfs / f"memory{b}/state").write_text("online\n")
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 48))  # 1 GiB online, 1 GiB offline
    assert (sysfs / "memory47/state").read_text() == "offline\n"
    for b in range(40, 48):
        (sysfs / f"memory{b}/state").write_text("online\n")
    assert blocks(mnt) == BOOT_BLOCKS | set(range(32, 56))
    assert (mnt / "memory-devices").read_text().count(f"size: {3 * GIB}\n") == 2  # requested and plugged
    with pytest.raises(OSError) as e:
        (sysfs / "memory40/state").write_text("online\n")  # already online
    assert e.value.errno == errno.EINVAL
