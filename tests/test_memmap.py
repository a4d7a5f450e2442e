"""memfs.memmap (the memory-map picture) and `memfs map`: well-formed, labelled, coloured, bounded, renderable."""
from __future__ import annotations

import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from memfs import memmap
from memfs.cli import main
from memfs.kernel.sizes import SZ_1G, SZ_1M
from memfs.loader import load_machine
from memfs.machine import Machine
from memfs.memmap import (CELL_W, LINUX_COLOURS, MAX_CELLS, MAX_ROWS, PLUGGED, UNPLUGGED, fmt_size, render_svg,
                          row_height, short_rule)

from conftest import DUMPS, QEMU_Q35_2G  # noqa: E402

NS = "{http://www.w3.org/2000/svg}"
RSVG = shutil.which("rsvg-convert")

HUGE = """
name = "huge"
phys_bits = 41
iomem_text = '''
00000000-00000fff : Reserved
00001000-0009ffff : System RAM
00100000-7fffffff : System RAM
'''
[settings]
memhp_default_state = "online"
zone_normal_unmovable = "0"
[[virtio_mem]]
addr = "0x100000000"
region_size = "1T"
block_size = "2M"
requested_size = "%s"
"""


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg"
    return root


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(NS + "text")]


def titled(root: ET.Element, needle: str) -> list[ET.Element]:
    """The tooltip groups (bands, verdicts, lane rows, cells) whose title contains needle."""
    return [g for g in root.iter(NS + "g") if needle in (g.findtext(NS + "title") or "")]


def fills(groups: list[ET.Element]) -> set[str]:
    return {r.get("fill", "") for g in groups for r in g.iter(NS + "rect")}


def cells(root: ET.Element, needle: str) -> list[ET.Element]:
    """Device-panel cells (their titles start with the address range of a block run)."""
    return [g for g in titled(root, needle) if (g.findtext(NS + "title") or "").startswith("0x")
            and any(r.get("width") == str(CELL_W) for r in g.iter(NS + "rect"))]


def resize(m: Machine, size: int) -> None:
    m.virtio["virtio0"].device.set_requested_size(size)
    m.run_pending_work()
    assert m.virtio["virtio0"].driver.plugged_size == size


def from_text(tmp_path: Path, toml: str) -> Machine:
    path = tmp_path / "machine.toml"
    path.write_text(toml)
    return load_machine(str(path))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def rsvg(svg: str, out: Path) -> tuple[int, int]:
    assert RSVG, "rsvg-convert is missing: run scripts/setup (Debian package librsvg2-bin)"
    done = subprocess.run([RSVG, "-o", str(out)], input=svg.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return png_size(out.read_bytes())


def test_default_machine_is_labelled() -> None:
    root = parse(render_svg(load_machine()))
    words = texts(root)
    for label in ("virtio0", "System RAM", "PCI MMCONFIG 0000 [bus 00-ff]", "refused: iomem_is_exclusive",
                  "refused: System RAM page", "refused: iomem_is_exclusive + System RAM page",
                  "zero-filled (RAM below 1 MiB)", "allowed", "4 GiB", "high_memory"):
        assert label in words, label
    assert {"00000000", "100000000", "200000000", "10000000000 (top)"} <= set(words)
    # the full rule is the tooltip of the verdict it explains
    assert titled(root, "iomem_is_exclusive: virtio0 (SYSTEM_RAM|EXCLUSIVE); devmem_is_allowed: System RAM page")
    assert titled(root, "iomem_is_exclusive: Local APIC (MEM|BUSY)")
    assert any(w.startswith("plugged, online (Normal)") for w in words)


def test_scale_is_piecewise() -> None:
    """A 1 KiB IOAPIC and a 967 GiB hole are both readable: heights grow with log2, not linearly."""
    assert row_height(1) == row_height(4096) == 16 and row_height(1 << 40) == 100
    root = parse(render_svg(load_machine()))

    def band_height(title: str) -> float:
        [band] = [g for g in titled(root, title) if g[1].get("x") == str(memmap.BX)]
        return float(band[1].get("height", 0))
    assert band_height("0xfec00000-0xfec003ff IOAPIC 0") == 16
    assert band_height("0xb40000000-0xfcffffffff: no resource") == row_height(967 * SZ_1G) == 97


def test_subblocks_plugged_and_unplugged_after_resize() -> None:
    m = load_machine(settings={"zone_normal_unmovable": "0"})
    root = parse(render_svg(m))
    assert not cells(root, "of 128 MiB plugged")
    assert fills(cells(root, "plugged, online (Normal): memory32-39 (×8)")) >= {PLUGGED}
    resize(m, SZ_1G + 64 * SZ_1M)
    root = parse(render_svg(m))
    partial = cells(root, "64 MiB of 128 MiB plugged, online (Normal): memory40")
    assert len(partial) == 1 and fills(partial) >= {PLUGGED, UNPLUGGED, LINUX_COLOURS["online"]}
    plugged = [r for r in partial[0].iter(NS + "rect") if r.get("fill") == PLUGGED]
    assert [float(r.get("width", 0)) for r in plugged] == [CELL_W / 2]
    assert cells(root, "unplugged, not added: memory41-63 (×23)")
    resize(m, 0)
    root = parse(render_svg(m))
    assert PLUGGED not in fills(titled(root, "virtio0")) and "plugged, online" not in " ".join(texts(root))


def test_offline_blocks_have_their_colour() -> None:
    m = load_machine(settings={"memhp_default_state": "offline"})
    root = parse(render_svg(m))
    assert LINUX_COLOURS["offline"] in fills(cells(root, "plugged, added, offline"))
    assert LINUX_COLOURS["online"] not in fills(titled(root, "virtio0"))
    m.hotplug.store_state(32, "online")
    root = parse(render_svg(m))
    assert LINUX_COLOURS["online"] in fills(cells(root, "plugged, online (Normal): memory32"))


@pytest.mark.parametrize("dump", DUMPS, ids=lambda p: p.name[:2])
def test_dumps_render(dump: Path) -> None:
    m = load_machine(iomem_file=str(dump))
    svg = render_svg(m)
    root = parse(svg)
    first = m.tree.root.children[0]
    assert titled(root, f"{first.start:#x}-{first.end:#x} {first.name}")
    assert len(svg) < 200_000
    assert len([w for w in texts(root) if set(w) <= set("0123456789abcdef") and len(w) >= 8]) <= MAX_ROWS + 1


def test_many_ranges_are_capped() -> None:
    dump = next(p for p in DUMPS if p.name.startswith("19-"))
    words = texts(parse(render_svg(load_machine(iomem_file=str(dump)))))
    assert "+261 more ranges up to 0xfffffffff not drawn" in words
    assert len([w for w in words if set(w) <= set("0123456789abcdef") and len(w) >= 8]) == MAX_ROWS + 1


def test_names_are_escaped(tmp_path: Path) -> None:
    evil = '<b>&amp; "q" \'s\' ]]> \x01\x1b\u2028 </svg>'
    dump = tmp_path / "evil.iomem"
    dump.write_text("00000000-00000fff : Reserved\n00001000-0009ffff : System RAM\n"
                    f"00100000-7fffffff : System RAM\n80000000-8000ffff : {evil}\n  80000000-80000fff : {evil}\n")
    root = parse(render_svg(load_machine(iomem_file=str(dump))))
    shown = evil.replace("\x01", "\ufffd").replace("\x1b", "\ufffd")
    assert titled(root, f"0x80000000-0x8000ffff {shown} (MEM)")
    assert titled(root, f"0x80000000-0x80000fff {shown}")      # a child, in its parent's tooltip


def test_arm64_and_no_strict_devmem() -> None:
    words = texts(parse(render_svg(load_machine(settings={"arch": "arm64", "iomem": "relaxed"}))))
    assert "refused: page_is_ram" in words and "zero-filled (RAM below 1 MiB)" not in words
    assert "high_memory" not in words
    words = texts(parse(render_svg(load_machine(settings={"STRICT_DEVMEM": "n"}))))
    assert not [w for w in words if w.startswith("refused:")] and "allowed" in words


def test_no_device_no_panel() -> None:
    root = parse(render_svg(load_machine(iomem_file=str(QEMU_Q35_2G))))
    assert "virtio0" not in " ".join(texts(root)) and not cells(root, "")


def test_big_block_mode(tmp_path: Path) -> None:
    m = from_text(tmp_path, HUGE.replace('block_size = "2M"', 'block_size = "128M"') % "1G")
    root = parse(render_svg(m))
    assert any("big block 128 MiB (BBM)" in w for w in texts(root))
    assert fills(cells(root, "plugged, online (Normal): memory32-39 (×8)")) >= {PLUGGED, LINUX_COLOURS["online"]}


def test_huge_region_is_bounded(tmp_path: Path) -> None:
    """1 TiB region, 128 fragmented blocks: one map row, the panel capped at MAX_CELLS cells."""
    m = from_text(tmp_path, HUGE % "16G")
    drv = m.virtio["virtio0"].driver
    bs = m.hotplug.block_size
    for i in range(128):
        drv.unplug_range(drv.addr + i * bs + (i % 64) * 2 * SZ_1M, 2 * SZ_1M)
    svg = render_svg(m)
    root = parse(svg)
    words = texts(root)
    assert len(svg) < 150_000
    assert f"+{129 - MAX_CELLS} more block runs up to 0x100ffffffff" in words
    assert "129 block runs: see virtio0 below" in words and "1 TiB" in words
    assert len(cells(root, "")) == MAX_CELLS
    rsvg(svg, tmp_path / "huge.png")


def test_rsvg_renders_it(tmp_path: Path) -> None:
    m = load_machine()
    resize(m, SZ_1G + 64 * SZ_1M)
    svg = render_svg(m)
    root = parse(svg)
    assert rsvg(svg, tmp_path / "map.png") == (int(root.get("width", 0)), int(root.get("height", 0)))
    assert (tmp_path / "map.png").stat().st_size > 20_000   # drawn, not blank


def test_render_changes_nothing() -> None:
    m = load_machine()
    before = (m.tree.generation, m.virtio["virtio0"].driver.plugged_ranges(), dict(m.virtio["virtio0"].device.violations))
    assert render_svg(m) == render_svg(m)
    assert (m.tree.generation, m.virtio["virtio0"].driver.plugged_ranges(),
            dict(m.virtio["virtio0"].device.violations)) == before


def test_sizes_and_rule_names() -> None:
    assert [fmt_size(n) for n in (0, 1000, 1024, 1536, 1088 * SZ_1M, 0x7FEE0000, (1 << 40) - 1, 1 << 64)] == \
        ["0 B", "1000 B", "1 KiB", "1.5 KiB", "1088 MiB", "≈2 GiB", "≈1 TiB", "16 EiB"]
    assert short_rule("iomem_is_exclusive: virtio0 (SYSTEM_RAM|EXCLUSIVE); devmem_is_allowed: System RAM page: "
                      "virtio0 (SYSTEM_RAM|EXCLUSIVE)") == "iomem_is_exclusive + System RAM page"
    assert short_rule("devmem_is_allowed: page_is_ram System RAM (SYSTEM_RAM|BUSY)") == "page_is_ram"


def test_cli_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.svg"
    assert main(["map", "-o", str(out)]) == 0
    assert "virtio0" in texts(parse(out.read_text()))
    assert main(["map", "--iomem", str(QEMU_Q35_2G), "--set", "arch=arm64", "-o", str(tmp_path / "m.png")]) == 0
    assert png_size((tmp_path / "m.png").read_bytes())[0] == memmap.WIDTH
    mnt = tmp_path / "mnt"                      # what a mount serves: copied byte for byte
    mnt.mkdir()
    (mnt / memmap.MAP_FILE).write_bytes(b"<svg>live</svg>")
    assert main(["map", str(mnt), "-o", str(tmp_path / "copy.svg")]) == 0
    assert (tmp_path / "copy.svg").read_bytes() == b"<svg>live</svg>"
    assert main(["map", str(tmp_path), "-o", str(tmp_path / "x.svg")]) == 1
    assert main(["map", str(mnt), "--iomem", str(QEMU_Q35_2G)]) == 2
    assert "memory-map.svg" in capsys.readouterr().err
