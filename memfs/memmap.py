"""A picture of a machine's physical address space: `render_svg(machine)` (MNT/memory-map.svg, `memfs map`).

The address space runs top to bottom, cut into rows at every top-level resource, every
change of /dev/mem's verdict and every run of alike memory blocks in a virtio-mem region.
Lanes: iomem (the top-level resource or hole, a labelled band coloured by what it reads as,
`bus.classify`); /dev/mem (`page_is_allowed()`: allowed, zero-filled, refused with a short
rule label; the full rule is the SVG <title>, a tooltip); virtio-mem (plugged memory, linear
inside the row, and the Linux memory blocks: online, added but offline, not added).
The scale is piecewise: a row's height grows with log2 of its size (a 4 KiB page and a
1 TiB hole both readable); rows are labelled with their start address, bands and verdicts
with their size. Below the map one panel per device draws its memory blocks as cells
(subblocks plugged/unplugged, block state as a strip; a run of alike blocks is one cell "×N").
Bounded output: MAX_ROWS rows, MAX_CELLS cells per device, MAX_DEVICES panels, bars merged
to pixels; the rest is counted ("+N more"). All text is escaped. Pure: changes nothing.
PNG: `rsvg-convert -o map.png map.svg` (Debian: librsvg2-bin); `memfs map -o map.png` runs it.
"""
from __future__ import annotations

import bisect
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import groupby, islice, takewhile
from xml.sax.saxutils import escape

from .bus import Kind, classify
from .kernel.devmem import Verdict
from .kernel.ioport import Resource, flag_names
from .kernel.sizes import PAGE_SHIFT
from .machine import Machine, VirtioMem
from .virtio_mem.sbm import Sbm

MAP_FILE = "memory-map.svg"
MAX_ROWS = 160
MAX_REGION_ROWS = 16      # block runs a region may add as rows; more: one row, details in its panel
MAX_CELLS = 96
MAX_DEVICES = 8
MAX_CHILDREN = 12         # children listed in a band's tooltip

WIDTH = 1120
AX, BX, BW, DX, DW, VX, VW = 10, 150, 240, 400, 300, 710, 110   # lane x positions and widths
CELL_W, CELL_STEP, CELL_H = 84, 92, 28
HOLE = "#ffffff"
KIND_COLOURS = {Kind.RAM: "#bbdefb", Kind.FIRMWARE: "#e1bee7", Kind.MMIO: "#ffe0b2",
                Kind.FLOAT: "#eceff1", Kind.DEVICE: "#b2dfdb"}
VERDICT_COLOURS = {1: "#a5d6a7", 2: "#fff59d", 0: "#ef9a9a"}
PLUGGED, UNPLUGGED = "#1e88e5", "#cfd8dc"
LINUX_COLOURS = {"online": "#00695c", "offline": "#f57c00", "absent": "#ffffff"}
LINUX_TEXT = {"online": "online", "offline": "added, offline", "absent": "not added"}

_UNITS = [(60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_SVG_STYLE = ("text{font-family:'DejaVu Sans',sans-serif;font-size:11px;fill:#212121}"
              ".m{font-family:'DejaVu Sans Mono',monospace;font-size:10.5px}"
              ".h{font-size:15px;font-weight:bold}.b{font-weight:bold}.s{font-size:10px;fill:#555}"
              ".hm{font-size:10px;fill:#c62828;font-style:italic}")


@dataclass(frozen=True)
class Run:
    """Alike blocks first_mb.. of a region, [start, end): `linux` online/offline/absent (not added),
    `plugged` [start, end) offsets in the first block (the same in each)."""

    start: int
    end: int
    first_mb: int
    count: int
    linux: str
    zone: str
    plugged: tuple[tuple[int, int], ...]


@dataclass
class _Device:
    name: str
    vm: VirtioMem
    runs: list[Run]
    plugged: list[tuple[int, int]]
    start: int
    end: int


@dataclass
class _Row:
    start: int
    end: int
    top: Resource | None
    verdict: Verdict
    device: _Device | None
    run: Run | None
    y: float = 0
    h: float = 0


def fmt_size(n: int) -> str:
    """A size as people read it: the largest unit that shows it exactly (≤ 1 decimal), else ≈."""
    if n < 1024:
        return f"{n} B"
    shown = [(f"{n / (1 << s):.1f}".removesuffix(".0"), 1 << s, u) for s, u in _UNITS if n * 20 >= 19 << s]
    for text, factor, unit in shown:
        if round(float(text) * factor) == n and float(text) < 10000:
            return f"{text} {unit}"
    return f"≈{shown[0][0]} {shown[0][2]}"


def short_rule(rule: str) -> str:
    """The kernel names of a refusal's rules: 'iomem_is_exclusive + System RAM page'."""
    names = []
    for part in rule.split("; "):
        words = part.split(": ")
        names.append(words[0] if words[0] != "devmem_is_allowed" or len(words) < 2
                     else "page_is_ram" if words[1].startswith("page_is_ram") else words[1])
    return " + ".join(names)


def verdict_label(v: Verdict) -> str:
    return {1: "allowed", 2: "zero-filled (RAM below 1 MiB)"}.get(v.allowed) or f"refused: {short_rule(v.rule)}"


def _clip(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Sorted disjoint [start, end) ranges cut to [lo, hi)."""
    rest = islice(ranges, bisect.bisect_right(ranges, lo, key=lambda r: r[1]), None)
    return [(max(lo, s), min(hi, e)) for s, e in takewhile(lambda r: r[0] < hi, rest)]


def block_runs(machine: Machine, vm: VirtioMem) -> list[Run]:
    """The device region as runs of alike Linux memory blocks (cost: blocks added + plugged ranges)."""
    dev, bs = vm.device, machine.hotplug.block_size
    lo, hi = dev.addr, dev.addr + dev.region_size
    plugged = vm.driver.plugged_ranges()
    blocks = {b.id: b for b in machine.hotplug.blocks_in(lo, dev.region_size)}
    first, stop = lo // bs, (hi - 1) // bs + 1
    cuts = {first, stop, *blocks, *(i + 1 for i in blocks)}
    for s, e in plugged:
        cuts.update((s // bs, s // bs + 1, (e - 1) // bs, (e - 1) // bs + 1))
    ids = sorted(c for c in cuts if first <= c <= stop)
    runs: list[Run] = []
    for a, b in zip(ids, ids[1:]):
        s, e = max(lo, a * bs), min(hi, (a + 1) * bs)
        block = blocks.get(a)
        linux = "absent" if block is None else "online" if block.online else "offline"
        zone = (block.zone or "") if block is not None and block.online else ""
        pattern = tuple((x - s, y - s) for x, y in _clip(plugged, s, e))
        last = runs[-1] if runs else None
        if last is not None and (last.linux, last.zone, last.plugged) == (linux, zone, pattern) \
                and last.end - last.start == last.count * (e - s):
            runs[-1] = replace(last, end=min(hi, b * bs), count=last.count + b - a)
        else:
            runs.append(Run(s, min(hi, b * bs), a, b - a, linux, zone, pattern))
    return runs


def _rows(m: Machine, devices: list[_Device], limit: int) -> tuple[list[_Row], int]:
    """The map's rows, at most MAX_ROWS, and how many more there would be."""
    cuts = {0, limit}
    for r in m.tree.root.children:
        cuts.update((r.start, r.end + 1))
    cuts.update(first << PAGE_SHIFT for first, _, _ in m.devmem.page_is_allowed_runs(0, (limit - 1) >> PAGE_SHIFT))
    for d in devices:
        cuts.update((d.start, d.end))
        if len(d.runs) <= MAX_REGION_ROWS:
            cuts.update(r.start for r in d.runs)
    bounds = sorted(c for c in cuts if c <= limit)
    rows: list[_Row] = []
    for s, e in zip(bounds, bounds[1:]):
        if len(rows) == MAX_ROWS:
            return rows, len(bounds) - 1 - MAX_ROWS
        dev = next((d for d in devices if d.start <= s < d.end), None)
        run = None
        if dev is not None and len(dev.runs) <= MAX_REGION_ROWS:
            run = next((r for r in dev.runs if r.start <= s < r.end), None)
        top = next(iter(m.tree.lookup(s)), None)
        rows.append(_Row(s, e, top, m.devmem.page_is_allowed(s >> PAGE_SHIFT), dev, run))
    return rows, 0


def row_height(size: int) -> int:
    """Piecewise scale: 16 px up to a page, then 3 px per doubling (1 TiB: 100 px)."""
    return 16 + 3 * max(0, size.bit_length() - 1 - PAGE_SHIFT)


def _esc(text: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", text), {'"': "&quot;"})


def _fit(text: str, width: float, px: float = 6.3) -> str:
    n = max(1, int(width / px))
    return text if len(text) <= n else text[:n - 1] + "…"


def _n(v: float) -> str:
    return f"{v:.1f}".removesuffix(".0")


class _Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(self, x: float, y: float, w: float, h: float, fill: str, extra: str = "") -> None:
        self.parts.append(f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" fill="{fill}"{extra}/>')

    def text(self, x: float, y: float, text: str, cls: str = "", anchor: str = "") -> None:
        attrs = (f' class="{cls}"' if cls else "") + (f' text-anchor="{anchor}"' if anchor else "")
        self.parts.append(f'<text x="{_n(x)}" y="{_n(y)}"{attrs}>{_esc(text)}</text>')

    def group(self, title: str) -> None:
        self.parts.append(f"<g><title>{_esc(title)}</title>")

    def bar(self, x: float, y: float, w: float, h: float, lo: int, hi: int,
            spans: Sequence[tuple[int, int]], fill: str) -> None:
        """spans inside [lo, hi) drawn linearly over [x, x+w), merged to whole pixels (at least 1 px)."""
        merged: list[list[float]] = []
        for s, e in _clip(spans, lo, hi):
            a = x + (s - lo) * w / (hi - lo)
            b = max(x + (e - lo) * w / (hi - lo), a + 1)
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in merged:
            self.rect(a, y, min(b, x + w) - a, h, fill)


def _legend(svg: _Svg, y: float, title: str, items: list[tuple[str, str]]) -> float:
    svg.text(AX, y + 10, title, "b")
    x = AX + 90.0
    for fill, text in items:
        if x + 20 + len(text) * 6.3 > WIDTH:
            x, y = AX + 90.0, y + 18
        svg.rect(x, y, 12, 12, fill, ' stroke="#757575" stroke-width="0.5"')
        svg.text(x + 16, y + 10, text)
        x += 30 + len(text) * 6.3
    return y + 20


def _header(svg: _Svg, m: Machine) -> float:
    svg.text(AX, 22, f"memfs memory map: {m.name}", "h")
    y = 27.0
    for line in textwrap.wrap(f"{m.phys_bits}-bit physical address space; {m.config.describe()}", 170):
        y += 13
        svg.text(AX, y, line, "s")
    kinds = zip((*KIND_COLOURS.values(), HOLE), ("System RAM", "firmware (ROM, Reserved, ACPI)", "MMIO / device",
                                                 "bridge window (unclaimed reads 0xff)", "virtio-mem region",
                                                 "no resource (reads 0xff)"))
    y = _legend(svg, y + 10, "iomem", list(kinds))
    y = _legend(svg, y, "/dev/mem", [(VERDICT_COLOURS[1], "allowed"),
                                     (VERDICT_COLOURS[2], "zero-filled (reads 0, writes dropped)"),
                                     (VERDICT_COLOURS[0], "refused, EPERM (rule shown; full rule on hover)")])
    y = _legend(svg, y, "virtio-mem", [(PLUGGED, "plugged"), (UNPLUGGED, "unplugged"),
                                       *((LINUX_COLOURS[k], f"block {LINUX_TEXT[k]}") for k in LINUX_COLOURS)])
    note = ("Scale: piecewise, a range's height grows with log2 of its size (not linear); "
            "the address is where a range starts.")
    if m.config.arch == "x86_64":
        note += " Dashed red: high_memory; read()/write() at or above it fail EFAULT."
    svg.text(AX, y + 10, note, "s")
    return y + 22


def _band_title(r: Resource) -> str:
    lines = [f"{r.start:#x}-{r.end:#x} {r.name or ''} ({flag_names(r.flags)}), {fmt_size(r.size)}"]
    lines += [f"  {c.start:#x}-{c.end:#x} {c.name or ''}" for c in r.children[:MAX_CHILDREN]]
    if len(r.children) > MAX_CHILDREN:
        lines.append(f"  +{len(r.children) - MAX_CHILDREN} more")
    return "\n".join(lines)


def _run_text(run: Run, bs: int) -> tuple[str, str]:
    """(what its blocks are, which blocks): 'plugged, online (Normal)', 'memory32-39 (×8)'."""
    size = min(run.end, (run.first_mb + 1) * bs) - run.start
    n = sum(e - s for s, e in run.plugged)
    plug = "plugged" if n == size else "unplugged" if n == 0 else f"{fmt_size(n)} of {fmt_size(size)} plugged"
    linux = f"online ({run.zone})" if run.linux == "online" and run.zone else LINUX_TEXT[run.linux]
    ids = f"memory{run.first_mb}" if run.count == 1 else f"memory{run.first_mb}-{run.first_mb + run.count - 1}"
    return f"{plug}, {linux}", ids + (f" (×{run.count})" if run.count > 1 else "")


def _label(svg: _Svg, x: float, y: float, h: float, main: str, sub: str, width: float, anchor: str = "") -> None:
    """main and sub on two lines in a tall box, else 'main · sub' on one."""
    if h >= 30:
        svg.text(x, y + h / 2 - 2, _fit(main, width), anchor=anchor)
        svg.text(x, y + h / 2 + 11, _fit(sub, width), "s", anchor)
    else:
        svg.text(x, y + h / 2 + 4, _fit(f"{main} · {sub}", width), anchor=anchor)


def _map(svg: _Svg, m: Machine, rows: list[_Row], hidden: int, limit: int, y: float) -> float:
    for x, text in ((AX, "address"), (BX, "iomem (top level)"), (DX, "/dev/mem: page_is_allowed()"),
                    (VX, "virtio-mem: plugged / Linux blocks")):
        svg.text(x, y + 12, text, "b")
    y += 18
    for r in rows:
        r.y, r.h = y, row_height(r.end - r.start)
        y += r.h
        svg.text(AX, r.y + 11, f"{r.start:08x}", "m")
    svg.text(AX, y + 11, f"{rows[-1].end:08x}" + ("" if hidden else " (top)"), "m")
    for g in (list(g) for _, g in groupby(rows, lambda r: id(r.top))):
        top, gy, gh = g[0].top, g[0].y, g[-1].y + g[-1].h - g[0].y
        kind = Kind.DEVICE if g[0].device else classify([top]) if top else None
        svg.group(_band_title(top) if top else f"{g[0].start:#x}-{g[-1].end - 1:#x}: no resource")
        svg.rect(BX, gy, BW, gh, KIND_COLOURS[kind] if kind else HOLE,
                 ' stroke="#616161" stroke-width="0.6"' + ("" if top else ' stroke-dasharray="3,3"'))
        name = (top.name or "(no name)") if top else "(no resource)"
        _label(svg, BX + BW / 2, gy, gh, name, fmt_size(top.size if top else g[-1].end - g[0].start), BW - 8, "middle")
        svg.parts.append("</g>")
    for g in (list(g) for _, g in groupby(rows, lambda r: r.verdict)):
        v, gy, gh, size = g[0].verdict, g[0].y, g[-1].y + g[-1].h - g[0].y, g[-1].end - g[0].start
        svg.group(f"{g[0].start:#x}-{g[-1].end - 1:#x} ({fmt_size(size)}): page_is_allowed() = {v.allowed}"
                  + (f": {v.rule}" if v.rule else ""))
        svg.rect(DX, gy, DW, gh, VERDICT_COLOURS[v.allowed], ' stroke="#ffffff" stroke-width="1"')
        _label(svg, DX + 6, gy, gh, verdict_label(v), fmt_size(size), DW - 10)
        svg.parts.append("</g>")
    for r in rows:
        if r.device is not None:
            _row_device(svg, m, r, r.device)
    if hidden:
        svg.text(BX, y + 28, f"+{hidden} more ranges up to {limit - 1:#x} not drawn", "b")
        y += 20
    hm = m.hotplug.high_memory_end + 1
    at = next((r for r in rows if r.start <= hm < r.end), None)
    if m.config.arch == "x86_64" and at is not None and hm:
        hy = _n(at.y + (hm - at.start) * at.h / (at.end - at.start))
        svg.parts.append(f'<line x1="{AX}" y1="{hy}" x2="{BX + BW}" y2="{hy}" stroke="#c62828" '
                         'stroke-width="1.2" stroke-dasharray="6,3"/>')
        svg.text(BX - 6, float(hy) - 2, "high_memory", "hm", "end")
    return y + 30


def _row_device(svg: _Svg, m: Machine, r: _Row, d: _Device) -> None:
    lo, hi, h = r.start, r.end, r.h - 2
    if r.run is not None:
        main, sub = _run_text(r.run, m.hotplug.block_size)
    else:
        n = sum(e - s for s, e in _clip(d.plugged, lo, hi))
        count = sum(1 for run in d.runs if run.start < hi and lo < run.end)
        main, sub = f"{fmt_size(n)} of {fmt_size(hi - lo)} plugged", f"{count} block runs: see {d.name} below"
    svg.group(f"{d.name} {lo:#x}-{hi - 1:#x}: {main}: {sub}")
    svg.rect(VX, r.y + 1, VW, h, UNPLUGGED)
    svg.bar(VX, r.y + 6, VW, h - 5, lo, hi, d.plugged, PLUGGED)
    svg.rect(VX, r.y + 1, VW, 5, LINUX_COLOURS["absent"])
    for state in ("online", "offline"):
        spans = [(u.start, u.end) for u in d.runs if u.linux == state]
        svg.bar(VX, r.y + 1, VW, 5, lo, hi, spans, LINUX_COLOURS[state])
    svg.rect(VX, r.y + 1, VW, h, "none", ' stroke="#616161" stroke-width="0.6"')
    _label(svg, VX + VW + 6, r.y, r.h, main, sub, WIDTH - VX - VW - 10)
    svg.parts.append("</g>")


def _panel(svg: _Svg, m: Machine, d: _Device, y: float) -> float:
    dev, drv, bs = d.vm.device, d.vm.driver, m.hotplug.block_size
    unit = f"subblock {fmt_size(drv.mode.sb_size)} (SBM)" if isinstance(drv.mode, Sbm) \
        else f"big block {fmt_size(drv.mode.bb_size)} (BBM)"
    svg.text(AX, y + 12, f"{d.name} ({dev.id}, {dev.memdev}): {d.start:#x}-{d.end - 1:#x}, region "
                         f"{fmt_size(dev.region_size)}, requested {fmt_size(dev.requested_size)}, plugged "
                         f"{fmt_size(dev.plugged_size)}, usable {fmt_size(dev.usable_region_size)}", "b")
    svg.text(AX, y + 27, f"device block {fmt_size(dev.block_size)}, Linux memory block {fmt_size(bs)}, {unit}; "
                         "unplugged memory " + ("faults (unplugged-inaccessible)" if dev.unplugged_inaccessible
                                                else "reads zeros") + "; one cell per memory block, ×N: N alike", "s")
    y += 36
    per_line = (WIDTH - AX) // CELL_STEP
    for i, run in enumerate(d.runs[:MAX_CELLS]):
        x, cy = AX + (i % per_line) * CELL_STEP, y + (i // per_line) * (CELL_H + 20)
        svg.group(f"{run.start:#x}-{run.end - 1:#x}: " + ": ".join(_run_text(run, bs)))
        if run.count > 1:
            svg.rect(x + 3, cy - 3, CELL_W, CELL_H, "#ffffff", ' stroke="#9e9e9e" stroke-width="0.6"')
        svg.rect(x, cy, CELL_W, CELL_H, UNPLUGGED)
        svg.bar(x, cy + 6, CELL_W, CELL_H - 6, run.start, min(run.end, (run.first_mb + 1) * bs),
                [(run.start + s, run.start + e) for s, e in run.plugged], PLUGGED)
        svg.rect(x, cy, CELL_W, 6, LINUX_COLOURS[run.linux])
        svg.rect(x, cy, CELL_W, CELL_H, "none", ' stroke="#424242" stroke-width="0.8"')
        ids = str(run.first_mb) + (f"-{run.first_mb + run.count - 1} ×{run.count}" if run.count > 1 else "")
        svg.text(x + CELL_W / 2, cy + CELL_H + 12, _fit(ids, CELL_STEP), "s", "middle")
        svg.parts.append("</g>")
    y += -(-min(len(d.runs), MAX_CELLS) // per_line) * (CELL_H + 20)
    if len(d.runs) > MAX_CELLS:
        svg.text(AX, y + 10, f"+{len(d.runs) - MAX_CELLS} more block runs up to {d.end - 1:#x}", "b")
        y += 18
    return y + 10


def render_svg(machine: Machine) -> str:
    """The picture of `machine` as it is now: a standalone SVG document."""
    m, svg = machine, _Svg()
    devices = [_Device(name, v, block_runs(m, v), v.driver.plugged_ranges(), v.device.addr,
                       v.device.addr + v.device.region_size) for name, v in list(m.virtio.items())[:MAX_DEVICES]]
    limit = min(1 << 64, max([m.size, *(r.end + 1 for r in m.tree.root.children)]))
    rows, hidden = _rows(m, devices, limit)
    y = _map(svg, m, rows, hidden, limit, _header(svg, m))
    for d in devices:
        y = _panel(svg, m, d, y)
    if len(m.virtio) > MAX_DEVICES:
        svg.text(AX, y + 12, f"+{len(m.virtio) - MAX_DEVICES} more virtio-mem devices", "b")
        y += 20
    height = int(y) + 10
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
            f'height="{height}" viewBox="0 0 {WIDTH} {height}">\n<style>{_SVG_STYLE}</style>\n'
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>\n' + "\n".join(svg.parts) + "\n</svg>\n")
