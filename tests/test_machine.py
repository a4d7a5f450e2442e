"""Machine access semantics in the model (spec 4.3-4.8, 6.9), without FUSE."""
from __future__ import annotations

import errno

import pytest
import trio

import pyfuse3
from memfs.fuse.ops import _guard
from memfs.kernel.mem import AccessError
from memfs.loader import MachineError, load_machine

GIB = 1 << 30


def err(fn, *args, **kw) -> int:
    with pytest.raises(AccessError) as e:
        fn(*args, **kw)
    return e.value.errno


def read(m, addr, n, mapped=False):
    return m.devmem.load_mapped(addr, n) if mapped else m.devmem.read_mem(addr, n)


def write(m, addr, data, mapped=False):
    if mapped:
        m.devmem.store_mapped(addr, data)
        return len(data)
    return m.devmem.write_mem(addr, data)


def test_default_machine_high_memory_follows_hotplug():
    m = load_machine(settings={"memhp_default_state": "online"})
    # boot RAM ends at 0x7ffdffff; the device's 1 GiB at 0x100000000 raised max_pfn
    assert m.hotplug.high_memory_end == 0x13FFFFFFF
    m.virtio["virtio0"].device.set_requested_size(3 * GIB)
    m.virtio["virtio0"].driver.run()
    assert m.hotplug.high_memory_end == 0x1BFFFFFFF
    m.virtio["virtio0"].device.set_requested_size(0)
    m.virtio["virtio0"].driver.run()
    assert m.hotplug.high_memory_end == 0x1BFFFFFFF  # never lowered
    assert err(read, m, 0x100000000, 4096) == errno.EPERM  # exclusive, below high_memory
    assert err(read, m, 0x1C0000000, 4096) == errno.EFAULT  # beyond it: checked first


def test_x86_valid_phys_addr_range_edges():
    m = load_machine(iomem_file=str(__import__("conftest").QEMU_Q35_2G))
    top = 0x7FFDFFFF
    assert m.devmem.valid_phys_addr_range(top, 1) and not m.devmem.valid_phys_addr_range(top, 2)
    assert not m.devmem.valid_phys_addr_range(0, 0)  # addr + count - 1 wraps
    assert m.devmem.valid_phys_addr_range(0x1000, 0)


def test_write_refused_on_a_later_page_keeps_earlier_pages_and_names_the_rule():
    m = load_machine()
    data = b"A" * 4096 + b"B" * 4096
    with pytest.raises(AccessError) as e:
        m.devmem.write_mem(0xFDFFF000, data)
    assert (e.value.errno, e.value.start) == (errno.EPERM, 0xFE000000)
    assert "virtio-pci-modern" in e.value.rule
    assert read(m, 0xFDFFF000, 4096) == b"A" * 4096


def test_zero_fill_pages_read_zeros_and_swallow_writes_but_map_real():
    m = load_machine()
    assert write(m, 0x2000, b"secret") == 6
    assert read(m, 0x2000, 6) == bytes(6)
    assert write(m, 0x2000, b"secret", mapped=True) == 6  # mmap maps the real page
    assert read(m, 0x2000, 6, mapped=True) == b"secret"
    assert read(m, 0x2000, 6) == bytes(6)


def test_arm64_reads_only_memblock_ram_and_device_refuses_unplugged():
    m = load_machine(settings={"arch": "arm64", "STRICT_DEVMEM": "n"})
    assert err(read, m, 0xFD000000, 4) == errno.EFAULT  # MMIO is not memblock memory
    assert write(m, 0x100000000, b"plugged") == 7
    assert read(m, 0x100000000, 7) == b"plugged"
    assert err(read, m, 0x180000000, 4) == errno.EFAULT  # not added: not memblock
    assert err(read, m, 0x180000000, 4, mapped=True) == errno.EFAULT  # mapped: the device refuses
    assert m.virtio["virtio0"].device.violations == {"read": 1, "write": 0}


def test_unplugged_inaccessible_off_reads_zeros_and_drops_writes(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('iomem = "%s"\n[settings]\narch = "arm64"\nSTRICT_DEVMEM = "n"\n[[virtio_mem]]\n'
                    'addr = "0x100000000"\nregion_size = "1G"\nrequested_size = "128M"\n'
                    'unplugged_inaccessible = false\n'
                    % (__import__("conftest").QEMU_Q35_2G))
    m = load_machine(str(toml))
    assert write(m, 0x110000000, b"lost", mapped=True) == 4
    assert read(m, 0x110000000, 4, mapped=True) == bytes(4)
    assert m.virtio["virtio0"].device.violations == {"read": 1, "write": 1}


def test_contents_by_kind(tmp_path):
    m = load_machine()
    segment = read(m, 0xF0000, 0x10000)
    assert b"_SM_" in segment and b"RSD PTR " in segment  # the generated firmware
    assert segment == read(load_machine(), 0xF0000, 0x10000)  # deterministic
    write(m, 0xF0000, b"x" * 64)
    assert read(m, 0xF0000, 0x10000) == segment  # read-only
    assert read(m, 0xC0000000, 8) == b"\xff" * 8  # a window with nothing behind it
    write(m, 0xC0000000, b"gone")
    assert read(m, 0xC0000000, 4) == b"\xff" * 4
    assert read(m, 0xFD000000, 4) == bytes(4)  # a BAR: MMIO, zeros at first
    write(m, 0xFD000000, b"regs")
    assert read(m, 0xFD000000, 4) == b"regs"
    toml = tmp_path / "m.toml"
    toml.write_text('iomem = "%s"\n[firmware]\nenabled = false\n' % __import__("conftest").QEMU_Q35_2G)
    rom = read(load_machine(str(toml)), 0xF0000, 64)
    assert rom != bytes(64) and rom == read(load_machine(str(toml)), 0xF0000, 64)  # fixed pseudo-random


@pytest.mark.parametrize("settings,needle", [
    ({"FOO": "y"}, "unknown setting 'FOO'"),
    ({"memhp_default_state": "sometimes"}, "expected one of offline, online"),
])
def test_bad_settings(settings, needle):
    with pytest.raises(ValueError) as e:
        load_machine(settings=settings)
    assert needle in str(e.value)


@pytest.mark.parametrize("toml,needle", [
    ('[[virtio_mem]]\naddr = "0x100000000"\n', "needs region_size"),
    ('[[virtio_mem]]\naddr = "0x100000001"\nregion_size = "1G"\n', "multiple"),
    ('bogus = 1\n', "unknown key(s) bogus"),
    ('[[resource]]\nrange = "0x2000-0x1000"\nname = "x"\n', "before start"),
    ('[[resource]]\nrange = "0x1000-0x1fff"\nname = "x"\nflags = "MEM|NOPE"\n', "unknown resource flag"),
])
def test_bad_machine_files(tmp_path, toml, needle):
    f = tmp_path / "m.toml"
    f.write_text(toml)
    with pytest.raises(MachineError) as e:
        load_machine(str(f))
    assert needle in str(e.value)


def test_handler_bug_becomes_eio_not_a_dead_daemon():
    @_guard
    async def broken():
        raise KeyError("bug")

    with pytest.raises(pyfuse3.FUSEError) as e:
        trio.run(broken)
    assert e.value.errno == errno.EIO


def test_high_memory_ignores_a_partial_last_page(tmp_path):
    dump = tmp_path / "d.iomem"
    dump.write_text("00001000-0009fbff : System RAM\n")
    m = load_machine(iomem_file=str(dump))
    assert m.hotplug.high_memory_end == 0x9EFFF  # max_pfn = 0x9f


def test_a_full_range_dump_loads_small(tmp_path):
    """Loading costs what the description holds, not the address space (one object per memory
    block over 2^64 bytes of RAM would never finish)."""
    import tracemalloc

    dump = tmp_path / "full.iomem"
    dump.write_text("00000000-ffffffffffffffff : System RAM\n")
    tracemalloc.start()
    try:
        m = load_machine(iomem_file=str(dump))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 << 20, peak
    assert read(m, 0x1000, 4) == bytes(4)  # zero-filled low RAM
    assert err(read, m, 0x100000000, 4096) == errno.EPERM
