"""memfs.firmware without external tools: the layout against /proc/iomem, parsed independently.

Every expectation is computed here from the iomem text or the raw bytes (own
parsers, own checksums), not from memfs.firmware's helpers. The real tools
(dmidecode, biosdecode, iasl, acpidump) run in test_firmware_tools.py.
"""
from __future__ import annotations

import os
import re
import struct
from importlib import resources
from pathlib import Path

import pytest

from memfs.firmware import Firmware, FirmwareError, FirmwareStrings, Platform, build_firmware, platform_from_tree
from memfs.infer import infer_flags
from memfs.kernel.iomem import parse

QEMU_Q35_2G = Path(str(resources.files("memfs.data").joinpath("qemu-q35-2G.iomem")))
IMAGE_SIZE = 1 << 32

# QEMU 7.2 i440fx, 3 GiB, two adapter ROMs (std VGA + e1000 + kvmvapic), no MMCONFIG.
I440FX_3G = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000c0000-000c93ff : Video ROM
000c9800-000ca1ff : Adapter ROM
000cb000-000cd3ff : Adapter ROM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-bffdffff : System RAM
  0c600000-0d0c3474 : Kernel code
bffe0000-bfffffff : Reserved
c0000000-febfffff : PCI Bus 0000:00
fec00000-fec003ff : IOAPIC 0
fed00000-fed003ff : HPET 0
  fed00000-fed003ff : PNP0103:00
fee00000-fee00fff : Local APIC
fffc0000-ffffffff : Reserved
"""

# A physical machine: an e820 ACPI Tables range, RAM above 4 GiB, MMCONFIG nested under Reserved.
PHYSICAL = """\
00000000-00000fff : Reserved
00001000-0009e7ff : System RAM
0009e800-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000c0000-000cebff : Video ROM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-cf5e6fff : System RAM
cf5e7000-cf7e6fff : ACPI Non-volatile Storage
cf7e7000-cf7fefff : ACPI Tables
cf7ff000-cf7fffff : System RAM
e0000000-efffffff : Reserved
  e0000000-e3ffffff : PCI MMCONFIG 0000 [bus 00-3f]
fec00000-fec003ff : IOAPIC 0
fec01000-fec013ff : IOAPIC 1
fed00000-fed003ff : HPET 0
fee00000-fee00fff : Local APIC
100000000-22fffffff : System RAM
"""

# QEMU arm64 virt: no F-segment, nothing to generate.
ARM64_VIRT = """\
08000000-0800ffff : GICD
09000000-09000fff : pl011@9000000
  09000000-09000fff : 9000000.pl011 pl011@9000000
10000000-3efeffff : pcie@10000000
40000000-bfffffff : System RAM
  40210000-41bbffff : Kernel code
4010000000-401fffffff : PCI ECAM
"""


def tree_of(text: str):
    tree = parse(text)
    infer_flags(tree)
    return tree


def platform_of(text: str, cpus: int = 1) -> Platform:
    platform = platform_from_tree(tree_of(text), cpus=cpus)
    assert platform is not None
    return platform


def iomem(text: str, pattern: str, top_level: bool = False) -> list[tuple[int, int]]:
    """(start, end) of the lines whose name matches `pattern`, parsed here from the text."""
    found = []
    for line in text.splitlines():
        m = re.fullmatch(r"( *)([0-9a-f]+)-([0-9a-f]+) : (.*)", line)
        assert m, line
        if re.fullmatch(pattern, m.group(4)) and not (top_level and m.group(1)):
            found.append((int(m.group(2), 16), int(m.group(3), 16)))
    return found


def write_image(fw: Firmware, path: Path) -> Path:
    """The firmware pieces in a sparse file the size of 4 GiB of physical memory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, IMAGE_SIZE)
        for addr, data in fw.pieces:
            os.pwrite(fd, data, addr)
    finally:
        os.close(fd)
    return path


class Image:
    """Reads of the image file, as a tool reading /dev/mem would see them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, addr: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, addr)

    def table(self, addr: int) -> bytes:
        return self(addr, struct.unpack("<I", self(addr + 4, 4))[0])


def sums_to_zero(data: bytes) -> bool:
    total = 0
    for byte in data:
        total = (total + byte) % 256
    return total == 0


@pytest.fixture(scope="module")
def q35_text() -> str:
    return QEMU_Q35_2G.read_text()


@pytest.fixture(scope="module")
def q35(q35_text) -> Platform:
    return platform_of(q35_text)


@pytest.fixture(scope="module")
def fw(q35) -> Firmware:
    return build_firmware(q35)


@pytest.fixture(scope="module")
def image(fw, tmp_path_factory) -> Image:
    return Image(write_image(fw, tmp_path_factory.mktemp("fw") / "mem.img"))


# -- platform -------------------------------------------------------------------------------

def test_platform_of_the_default_layout_is_read_off_iomem(q35, q35_text):
    assert [(r.start, r.end) for r in q35.ram] == iomem(q35_text, "System RAM", top_level=True)
    assert (q35.ebda.start, q35.ebda.end) == (0x9FC00, 0x9FFFF)
    assert (q35.video_rom.start, q35.video_rom.end) == iomem(q35_text, "Video ROM")[0]
    assert [(r.start, r.end) for r in q35.adapter_roms] == iomem(q35_text, "Adapter ROM")
    assert (q35.acpi_area.start, q35.acpi_area.end) == (0x7FFE0000, 0x7FFFFFFF)
    assert [(a.range.start, a.ident) for a in q35.ioapics] == [(iomem(q35_text, "IOAPIC 0")[0][0], 0)]
    assert (q35.hpet.start, q35.hpet.end) == iomem(q35_text, "HPET 0")[0]
    assert q35.local_apic == iomem(q35_text, "Local APIC")[0][0]
    [seg] = q35.pci_segments
    assert (seg.range.start, seg.range.end, seg.bus_start, seg.bus_end) == (0xB0000000, 0xBFFFFFFF, 0, 0xFF)
    assert q35.memory_size == 2 << 30  # -m 2G: low RAM up to the end of SeaBIOS's reserved tail


@pytest.mark.parametrize("text", [ARM64_VIRT, QEMU_Q35_2G.read_text().replace("System ROM", "Reserved"),
                                  re.sub(r"[0-9a-f]+-[0-9a-f]+ :", "00000000-00000000 :", QEMU_Q35_2G.read_text())],
                         ids=["arm64-virt", "no-system-rom", "unprivileged-all-zero"])
def test_no_x86_f_segment_means_no_firmware(text):
    assert platform_from_tree(tree_of(text)) is None


def test_other_layouts_find_their_ranges():
    i440fx = platform_of(I440FX_3G)
    assert i440fx.memory_size == 3 << 30 and not i440fx.pci_segments
    assert [(r.start, r.end) for r in i440fx.adapter_roms] == iomem(I440FX_3G, "Adapter ROM")
    physical = platform_of(PHYSICAL, cpus=4)
    assert (physical.acpi_area.start, physical.acpi_area.end) == iomem(PHYSICAL, "ACPI Tables")[0]
    assert [a.ident for a in physical.ioapics] == [0, 1]
    assert [(s.base, s.bus_end) for s in physical.pci_segments] == [(0xE0000000, 0x3F)]
    assert [(b.start, b.end) for b in physical.memory_blocks] == [(0, 0xCF7FFFFF), (1 << 32, 0x22FFFFFFF)]


def test_identity_strings_are_checked():
    with pytest.raises(FirmwareError, match="MM/DD/YYYY"):
        FirmwareStrings(bios_date="2014-04-01")
    with pytest.raises(FirmwareError, match="system_uuid"):
        FirmwareStrings(system_uuid="not-a-uuid")
    with pytest.raises(FirmwareError, match="NUL"):
        FirmwareStrings(system_product="a\0b")
    with pytest.raises(FirmwareError, match="cpus"):
        platform_of(I440FX_3G, cpus=0)


# -- pieces and lookups -----------------------------------------------------------------------

def test_pieces_are_sorted_disjoint_and_fill_firmware_ranges_only(fw, q35_text):
    ends = [a + len(d) for a, d in fw.pieces]
    assert all(end <= nxt for end, (nxt, _) in zip(ends, fw.pieces[1:]))
    wanted = {r for name in ("Video ROM", "Adapter ROM", "System ROM") for r in iomem(q35_text, name)}
    wanted |= {(0x9FC00, 0x9FFFF), (0x7FFE0000, 0x7FFFFFFF), (0, 0xFFF)}
    wanted |= {(0xFFFF0000, 0xFFFFFFFF)}  # the flash's alias of the F-segment below 4 GiB
    assert {(a, a + len(d) - 1) for a, d in fw.pieces} == wanted
    assert fw.read(0xFFFF0000, 0x10000) == fw.read(0xF0000, 0x10000)
    for start, end in iomem(q35_text, "System RAM", top_level=True):
        assert all(a + len(d) <= start or a > end for a, d in fw.pieces)


def test_read_answers_covered_ranges_and_says_none_elsewhere(fw, image):
    assert fw.read(0xF0000, 0x10000) == image(0xF0000, 0x10000)
    assert fw.read(0xFFFF0, 16)[:1] == b"\xea"
    assert fw.read(0x100000, 4096) is None          # System RAM
    assert fw.read(0xFFFF0, 32) is None             # runs past the System ROM into nothing
    assert fw.read(0x9F000, 0x1000) is None         # RAM page holding the EBDA's start
    page = bytearray(b"\x11" * 0x1000)
    assert fw.overlay(0x9F000, page) == 0x400
    assert page[:0xC00] == b"\x11" * 0xC00 and page[0xC00:] == image(0x9FC00, 0x400)
    assert fw.covers(0x7FFE0000) and not fw.covers(0x7FFDFFFF)


# -- legacy BIOS area -------------------------------------------------------------------------

def test_ivt_points_into_the_f_segment_and_int10_into_the_video_rom(image, q35_text):
    vectors = struct.unpack("<512H", image(0, 1024))
    video_segment = iomem(q35_text, "Video ROM")[0][0] >> 4
    for vec in range(256):
        offset, segment = vectors[2 * vec], vectors[2 * vec + 1]
        if 0x60 <= vec <= 0x66 or vec == 0x79:
            assert (segment, offset) == (0, 0)
        elif vec == 0x10:
            assert segment == video_segment and image((segment << 4) + offset, 1) == b"\xcf"
        elif vec not in (0x1D, 0x1E, 0x1F):  # data tables, not code
            assert segment == 0xF000, hex(vec)
            assert image(0xF0000 + offset, 1) in (b"\xcf", b"\xfa"), hex(vec)  # iret, or POST's cli


def test_bda_matches_iomem(image, q35_text):
    low_ram_end = iomem(q35_text, "System RAM")[0][1] + 1
    ebda = next(r for r in iomem(q35_text, "Reserved") if r[0] == low_ram_end)
    assert struct.unpack("<H", image(0x413, 2))[0] * 1024 == low_ram_end
    assert struct.unpack("<H", image(0x40E, 2))[0] << 4 == ebda[0]
    assert image(ebda[0], 1)[0] * 1024 == ebda[1] - ebda[0] + 1   # EBDA size byte, KiB
    assert struct.unpack("<H", image(0x400, 2))[0] == 0x3F8        # COM1


def test_system_rom_has_reset_vector_date_and_model(image):
    assert image(0xFFFF0, 1) == b"\xea"
    offset, segment = struct.unpack("<HH", image(0xFFFF1, 4))
    assert segment == 0xF000 and image((segment << 4) + offset, 1) == b"\xfa"
    assert image(0xFFFF5, 8) == b"04/01/14"
    assert image(0xFFFFE, 1) == b"\xfc"
    fw = build_firmware(platform_of(I440FX_3G), FirmwareStrings(bios_date="12/31/2023"))
    assert fw.read(0xFFFF5, 8) == b"12/31/23"


def probe_roms(read) -> list[tuple[int, int]]:
    """arch/x86/kernel/probe_roms.c probe_roms(), as far as it decides which ROM resources exist."""
    def signature(at):
        return read(at, 2) == b"\x55\xaa"

    found = []
    video_end, upper = 0xC7FFF, 0xC8000
    for start in range(0xC0000, upper, 2048):
        if signature(start):
            length = read(start + 2, 1)[0] * 512
            if length and sums_to_zero(read(start, length)):
                video_end = start + length - 1
            found.append((start, video_end))
            break
    start = max((video_end + 1 + 2047) & ~2047, upper)
    upper = 0xF0000
    if signature(0xE0000) and sums_to_zero(read(0xE0000, 0x10000)):
        upper = 0xE0000
    while start < upper:
        if signature(start):
            length = read(start + 2, 1)[0] * 512
            if length and start + length <= upper and sums_to_zero(read(start, length)):
                found.append((start, start + length - 1))
                start = (start + length - 1) & ~2047
        start += 2048
    return found


@pytest.mark.parametrize("text", [QEMU_Q35_2G.read_text(), I440FX_3G, PHYSICAL], ids=["q35", "i440fx", "physical"])
def test_probe_roms_finds_exactly_the_iomem_roms(text, tmp_path):
    image = Image(write_image(build_firmware(platform_of(text)), tmp_path / "mem.img"))
    assert probe_roms(image) == iomem(text, "Video ROM|Adapter ROM")
    video = iomem(text, "Video ROM")[0][0]
    pcir = video + struct.unpack("<H", image(video + 0x18, 2))[0]
    assert image(pcir, 4) == b"PCIR" and image(pcir + 0xF, 1) == b"\x03"  # VGA class code


def test_option_roms_probe_roms_could_not_have_found_are_refused():
    bad = I440FX_3G.replace("000c9800-000ca1ff : Adapter ROM", "000c9900-000ca1ff : Adapter ROM")
    with pytest.raises(FirmwareError, match="option ROM"):
        build_firmware(platform_of(bad))


# -- SMBIOS -----------------------------------------------------------------------------------

def find_anchor(image: Image, anchor: bytes) -> int:
    fseg = image(0xF0000, 0x10000)
    hits = [0xF0000 + i for i in range(0, 0x10000, 16) if fseg[i:i + len(anchor)] == anchor]
    assert len(hits) == 1, (anchor, hits)
    return hits[0]


def smbios_structures(table: bytes) -> list[tuple[int, int, bytes, list[bytes]]]:
    """(type, handle, formatted area, strings) of each structure up to and including type 127."""
    out, at = [], 0
    while True:
        kind, length, handle = struct.unpack_from("<BBH", table, at)
        end = table.index(b"\0\0", at + length)
        strings = table[at + length:end].split(b"\0") if end > at + length else []
        out.append((kind, handle, table[at:at + length], strings))
        at = end + 2
        if kind == 127:
            assert at == len(table)
            return out


def test_smbios_entry_point_and_table_are_valid_and_where_seabios_puts_them(fw, image):
    at = find_anchor(image, b"_SM_")
    ep = image(at, 0x1F)
    assert ep == fw.smbios_entry_point and ep[5] == 0x1F and (ep[6], ep[7]) == (2, 8)
    assert sums_to_zero(ep) and ep[0x10:0x15] == b"_DMI_" and sums_to_zero(ep[0x10:])
    length, address, count = struct.unpack_from("<HIH", ep, 0x16)
    assert 0xF0000 <= address and address + length <= 0x100000 and address % 16 == 0 and at % 16 == 0
    table = image(address, length)
    assert table == fw.dmi_table
    structures = smbios_structures(table)
    assert len(structures) == count
    assert max(len(s[2]) + sum(len(x) + 1 for x in s[3]) + (1 if s[3] else 2) for s in structures) == \
        struct.unpack_from("<H", ep, 8)[0]
    assert [s[0] for s in structures] == [0, 1, 3, 4, 16, 17, 19, 32, 127]


def test_smbios_memory_matches_boot_ram(fw, q35_text):
    structures = smbios_structures(fw.dmi_table)
    sizes = [struct.unpack_from("<H", s[2], 0x0C)[0] for s in structures if s[0] == 17]
    low_top = next(e for s, e in iomem(q35_text, "Reserved") if s == iomem(q35_text, "System RAM")[1][1] + 1)
    assert sum(sizes) << 20 == low_top + 1 == 2 << 30
    mapped = [struct.unpack_from("<II", s[2], 4) for s in structures if s[0] == 19]
    for start, end in iomem(q35_text, "System RAM", top_level=True):
        assert any(lo << 10 <= start and end <= (hi << 10) + 1023 for lo, hi in mapped)
    assert sum(((hi + 1) << 10) - (lo << 10) for lo, hi in mapped) == sum(sizes) << 20


def test_smbios_3_with_many_cpus_goes_high(tmp_path):
    fw = build_firmware(platform_of(QEMU_Q35_2G.read_text(), cpus=16), smbios_entry="3.0")
    image = Image(write_image(fw, tmp_path / "mem.img"))
    ep = image(find_anchor(image, b"_SM3_"), 0x18)
    assert sums_to_zero(ep) and ep[6] == 0x18 and ep[7] == 3
    size, address = struct.unpack_from("<IQ", ep, 0x0C)
    assert size > 600 and 0x7FFE0000 <= address and address + size <= 0x80000000  # the ACPI area
    kinds = [s[0] for s in smbios_structures(image(address, size))]
    assert kinds.count(4) == 16


# -- ACPI -------------------------------------------------------------------------------------

def test_rsdp_checksums_and_root_tables(fw, image):
    at = find_anchor(image, b"RSD PTR ")
    rsdp = image(at, 36)
    assert at == fw.rsdp_address and rsdp[15] == 2 and sums_to_zero(rsdp[:20]) and sums_to_zero(rsdp)
    rsdt_at, length, xsdt_at = struct.unpack_from("<IIQ", rsdp, 16)
    assert length == 36
    rsdt, xsdt = image.table(rsdt_at), image.table(xsdt_at)
    assert rsdt[:4] == b"RSDT" and xsdt[:4] == b"XSDT" and sums_to_zero(rsdt) and sums_to_zero(xsdt)
    from_rsdt = struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:])
    assert list(from_rsdt) == list(struct.unpack(f"<{(len(xsdt) - 36) // 8}Q", xsdt[36:]))
    seen = {image(a, 4).decode(): image.table(a) for a in from_rsdt}
    facp = seen["FACP"]
    facs_at, dsdt_at = struct.unpack_from("<II", facp, 36)
    assert struct.unpack_from("<QQ", facp, 132) == (0, dsdt_at)   # X_FIRMWARE_CTRL unused, X_DSDT
    assert facs_at % 64 == 0
    seen["FACS"], seen["DSDT"] = image(facs_at, 64), image.table(dsdt_at)
    assert seen == fw.acpi_tables and sorted(seen) == ["APIC", "DSDT", "FACP", "FACS", "HPET", "MCFG", "WAET"]
    for name, data in seen.items():
        assert name == "FACS" or sums_to_zero(data), name
    for addr in (*from_rsdt, facs_at, dsdt_at, rsdt_at, xsdt_at):
        assert 0x7FFE0000 <= addr and addr + len(image.table(addr)) <= 0x80000000


def test_fadt_is_qemu_q35s(fw):
    facp = fw.acpi_tables["FACP"]
    assert len(facp) == 244 and facp[8] == 3
    sci, smi = struct.unpack_from("<HI", facp, 46)
    assert (sci, smi) == (9, 0xB2)
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr, gpe0 = struct.unpack_from("<7I", facp, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr, gpe0) == (0x600, 0x604, 0x608, 0x620)
    assert struct.unpack_from("<BBQ", facp, 208 + 0)[0:1] == (1,)            # X_PM_TMR_BLK in I/O space
    assert struct.unpack_from("<Q", facp, 208 + 4)[0] == 0x608
    assert struct.unpack_from("<Q", facp, 116 + 4)[0] == 0xCF9 and facp[128] == 0x0F  # reset register


# The default layout with the HPET, I/O APIC, local APIC and MMCONFIG elsewhere: the tables follow.
MOVED = (QEMU_Q35_2G.read_text().replace("fed00000-fed003ff", "fed01000-fed013ff")
         .replace("fec00000-fec003ff : IOAPIC 0", "fec10000-fec103ff : IOAPIC 0")
         .replace("fee00000-fee00fff : Local APIC", "fee10000-fee10fff : Local APIC")
         .replace("b0000000-bfffffff", "b8000000-bbffffff").replace("[bus 00-ff]", "[bus 80-bf]"))


@pytest.mark.parametrize("q35_text", [QEMU_Q35_2G.read_text(), MOVED], ids=["default", "moved"])
def test_madt_hpet_mcfg_match_iomem(q35_text):
    cpus = 3
    fw = build_firmware(platform_of(q35_text, cpus=cpus))
    madt = fw.acpi_tables["APIC"]
    assert struct.unpack_from("<I", madt, 36)[0] == iomem(q35_text, "Local APIC")[0][0]
    entries, at = [], 44
    while at < len(madt):
        entries.append(madt[at:at + madt[at + 1]])
        at += madt[at + 1]
    assert at == len(madt)
    assert [e[3] for e in entries if e[0] == 0] == list(range(cpus))                  # APIC ids
    [ioapic] = [e for e in entries if e[0] == 1]
    assert struct.unpack_from("<BxII", ioapic, 2) == (0, iomem(q35_text, "IOAPIC 0")[0][0], 0)
    overrides = {e[3]: struct.unpack_from("<IH", e, 4) for e in entries if e[0] == 2}
    assert overrides == {0: (2, 0), 5: (5, 0xD), 9: (9, 0xD), 10: (10, 0xD), 11: (11, 0xD)}
    hpet = fw.acpi_tables["HPET"]
    assert hpet[40] == 0 and struct.unpack_from("<Q", hpet, 44)[0] == iomem(q35_text, "HPET 0")[0][0]
    mcfg = fw.acpi_tables["MCFG"]
    (start, end), = iomem(q35_text, r"PCI MMCONFIG 0000 \[bus [0-9a-f]{2}-[0-9a-f]{2}\]")
    first, last = (int(b, 16) for b in re.search(r"bus (..)-(..)", q35_text).groups())
    assert len(mcfg) == 44 + 16 and last - first + 1 == (end - start + 1) >> 20
    assert struct.unpack_from("<QHBB", mcfg, 44) == (start - (first << 20), 0, first, last)


def test_dsdt_describes_hpet_and_mmconfig(fw, q35_text):
    dsdt = fw.acpi_tables["DSDT"]
    assert dsdt[:4] == b"DSDT" and b"_SB_" in dsdt and b"PCI0" in dsdt
    hpet, = iomem(q35_text, "HPET 0")
    assert struct.pack("<BHBII", 0x86, 9, 0, hpet[0], hpet[1] - hpet[0] + 1) in dsdt
    mmcfg, = iomem(q35_text, r"PCI MMCONFIG .*")
    assert struct.pack("<BHBII", 0x86, 9, 1, mmcfg[0], mmcfg[1] - mmcfg[0] + 1) in dsdt


def test_tables_land_in_an_acpi_tables_range_and_cover_every_ioapic(tmp_path):
    fw = build_firmware(platform_of(PHYSICAL, cpus=4))
    (lo, hi), = iomem(PHYSICAL, "ACPI Tables")
    assert all(lo <= a <= hi for a in fw.acpi_table_addresses.values())
    madt = fw.acpi_tables["APIC"]
    ioapics = [struct.unpack_from("<BxII", madt, i + 2) for i in range(44, len(madt)) if madt[i:i + 2] == b"\x01\x0c"]
    assert ioapics == [(0, 0xFEC00000, 0), (1, 0xFEC01000, 24)]
    assert struct.unpack_from("<QHBB", fw.acpi_tables["MCFG"], 44) == (0xE0000000, 0, 0, 0x3F)
