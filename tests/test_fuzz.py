"""Issue 10 item 9: fuzzing the control language (in the model) and the /proc/iomem parser.

Control: random command sequences built from the grammar, plus garbage, with sizes and
addresses near every boundary the machine has (granules, plugged-range edges, the usable
region, the region, 2^64). After every command:

* a failed command (ControlError) changed nothing: proc/iomem, every device's requested,
  plugged and usable sizes and its block bitmap, the driver's plugged ranges and flags,
  the memory blocks, high_memory, and sampled memory contents;
* a successful one did what it says (plug/unplug: exactly that range, requested-size: the
  device's requested size, unplug-all: nothing plugged);
* always: the device's bitmap and the driver's plugged ranges agree, plugged memory lies in
  the usable region and in the device's System RAM (virtio_mem) resources, unplugged memory
  reads as zeros in the backend (discarded), proc/iomem re-parses to the same text, and the
  errno is one the README lists.

Parser: random text either parses and renders back byte for byte, or raises IomemParseError
naming a line number (for generated line sequences, the right one); never another exception,
never slow.

`python tests/test_fuzz.py [N] [--seed S]` (scripts/fuzz) runs N commands (default 10,000)
with the same checks, seeded, and prints a summary.
"""
from __future__ import annotations

import argparse
import collections
import errno
import random
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from memfs.control import MAX_COMMAND, Control, ControlError
from memfs.kernel.iomem import IomemParseError, parse, render
from memfs.kernel.resource import MAX_IORES_LEVEL
from memfs.loader import load_machine
from memfs.machine import Machine
from memfs.units import parse_addr, parse_size

TESTS = Path(__file__).parent
DUMPS = sorted((TESTS / "data" / "iomem").glob("*.txt"))
QEMU_Q35_2G = Path(__file__).parent.parent / "memfs" / "data" / "qemu-q35-2G.iomem"
MIB, GIB = 1 << 20, 1 << 30
U64 = 1 << 64
LISTED_ERRNOS = {errno.EINVAL, errno.ENODEV, errno.ERANGE, errno.EBUSY, errno.ENOSPC}
RESOURCE_NAME = "System RAM (virtio_mem)"

TWO_DEVICES = f"""
iomem = "{QEMU_Q35_2G}"
[settings]
memhp_default_state = "online_movable"
[[virtio_mem]]
addr = "0x100000000"
region_size = "1G"
requested_size = "256M"
[[virtio_mem]]
addr = "0x140000000"
region_size = "2G"
block_size = "256M"
requested_size = "512M"
id = "vmem1"
node = 1
"""


def _two_devices() -> Machine:
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(TWO_DEVICES)
        f.flush()
        return load_machine(f.name)


# The default machine onlines added memory into ZONE_NORMAL with unmovable pages in its
# first block (EBUSY paths); offline hits the offline threshold (partial ENOSPC); movable
# empties everything; two devices: an SBM device next to a BBM one (256 MiB blocks).
MACHINES = {
    "default": lambda: load_machine(),
    "offline": lambda: load_machine(settings={"memhp_default_state": "offline"}),
    "movable": lambda: load_machine(settings={"memhp_default_state": "online_movable"}),
    "two-devices": _two_devices,
}


# -- drawing: the same grammar from hypothesis (the suite) or random (scripts/fuzz) --------------------


class RandomDraw:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, items):
        return self.rng.choice(list(items))

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def coin(self, p: float) -> bool:
        return self.rng.random() < p

    def text(self, max_size: int) -> str:
        n = self.rng.randint(0, max_size)
        pool = "abcxyz019-_ .:\t\n\u00a0\u2028é\x00\x7f"
        return "".join(self.rng.choice(pool) for _ in range(n))

    def binary(self, max_size: int) -> bytes:
        return bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, max_size)))


class HypothesisDraw:
    def __init__(self, data) -> None:
        self.data = data

    def choice(self, items):
        return self.data.draw(st.sampled_from(list(items)))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def coin(self, p: float) -> bool:
        return self.data.draw(st.integers(0, 999)) < p * 1000

    def text(self, max_size: int) -> str:
        return self.data.draw(st.text(max_size=max_size))

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


def number(draw, value: int, size: bool) -> str:
    """A value written the ways people write it, now and then in a way the parser must refuse."""
    value %= U64 * 4   # up to 2^66: beyond 64 bits too
    forms = [str(value), hex(value), f"0X{value:X}"]
    if size:
        for unit, shift in (("K", 10), ("M", 20), ("G", 30), ("T", 40)):
            if value and value % (1 << shift) == 0:
                n = value >> shift
                forms += [f"{n}{unit}", f"{n}{unit.lower()}", f"{n}{unit}iB", f"{n}{unit}B", f"{hex(n)}{unit}"]
    if draw.coin(0.08):
        forms = [f"0{value}", f"+{value}", f"-{value}", f"{value}.5G", f"{value}_0", f"0b{value:b}", f"{value}Q",
                 "0x", "", f"0o{value:o}", f"{value}M" if not size else f"{value}MM", f"{value}e3"]
    return draw.choice(forms)


def interesting_sizes(v) -> list[int]:
    d, gran = v.device, v.driver.mode.geometry().granule
    base = [0, 1, 4096, gran - 1, gran, gran + 1, 2 * gran, 3 * gran, 64 * gran, d.block_size, 128 * MIB, GIB,
            d.requested_size, d.plugged_size, d.usable_region_size, d.region_size, U64 - 1, U64, U64 + gran]
    near = [x + k for x in (d.requested_size, d.plugged_size, d.usable_region_size, d.region_size)
            for k in (-gran, gran, -d.block_size, d.block_size)]
    return [x for x in base + near if x >= 0]


def interesting_addrs(v) -> list[int]:
    d, gran = v.device, v.driver.mode.geometry().granule
    edges = [d.addr, d.addr + d.usable_region_size, d.addr + d.region_size]
    for start, end in v.driver.plugged_ranges()[:8]:
        edges += [start, end]
    out = [0, U64 - 1, U64, d.addr - gran, d.addr + 4096, d.addr + 1, d.addr + gran // 2]
    for e in edges:
        out += [e - 2 * gran, e - gran, e, e + gran]
    return [a for a in out if a >= 0]


def command(draw, m: Machine) -> bytes:
    """One write's bytes: mostly the grammar, with its words and values near the boundaries."""
    if draw.coin(0.03):
        return draw.binary(24)
    if draw.coin(0.01):
        return b"virtio0 requested-size 1G" + b" " * draw.choice([MAX_COMMAND, MAX_COMMAND - 26])
    if draw.coin(0.02):
        return draw.choice([b"help", b"help\n", b" help ", b"virtio0 requested-size \xff1G", b"\n"])
    name = draw.choice(m.virtio)
    v = m.virtio[name]
    dev = name if draw.coin(0.85) else draw.choice([v.device.id, "virtio7", "VIRTIO0", f"{name}x", "help", "vmem"])
    if draw.coin(0.02):
        dev = draw.text(8)
    verb = draw.choice(["requested-size", "plug", "unplug", "unplug-all"]) if draw.coin(0.95) else \
        draw.choice(["help", "Plug", "requested_size", "unplug_all", "", "plug-all"])
    d, gran = v.device, v.driver.mode.geometry().granule
    if verb in ("requested-size", "requested_size"):
        size = (draw.choice(interesting_sizes(v)) if draw.coin(0.4) else
                draw.integer(0, d.region_size // d.block_size) * d.block_size)
        args = [number(draw, size, size=True)]
    elif verb in ("plug", "unplug", "Plug"):
        size = draw.choice(interesting_sizes(v)) if draw.coin(0.2) else gran * draw.choice([1, 1, 2, 3, 4, 7, 64])
        r = draw.integer(0, 9)
        ranges = v.driver.plugged_ranges()
        if r < 4:      # any granule of the usable region
            addr = d.addr + draw.integer(0, max(d.usable_region_size // gran - 1, 0)) * gran
        elif r < 7 and ranges:   # inside a plugged range
            start, end = draw.choice(ranges)
            addr = start + draw.integer(0, (end - start) // gran - 1) * gran
        else:
            addr = draw.choice(interesting_addrs(v))
        args = [number(draw, addr, size=False), number(draw, size, size=True)]
    else:
        args = []
    if draw.coin(0.05):
        args = args[:-1] if args and draw.coin(0.5) else args + [draw.choice(["1", "extra", "0x0", "2M"])]
    sep = draw.choice([" ", " ", " ", "\t", "  ", "\n", " \u00a0 "])
    text = sep.join([dev, verb, *args])
    text = draw.choice(["", "", " ", "\n"]) + text + draw.choice(["", "\n", "\n", " \n"])
    return text.encode()


# -- state and invariants ---------------------------------------------------------------------------


def samples(v) -> list[int]:
    """Backend offsets sampled in every memory block and at the edges of every granule near them."""
    d, gran = v.device, v.driver.mode.geometry().granule
    step = max(128 * MIB, gran)
    out = set()
    for block in range(0, d.region_size, step):
        out |= {block, block + gran - 8, block + gran, block + step - 8}
    return sorted(o for o in out if 0 <= o <= d.region_size - 8)


def device_plugged(v) -> list[tuple[int, int]]:
    d = v.device
    return [(s, e) for s, e, plugged in d.plugged_runs(d.addr, d.region_size) if plugged]


def snapshot(m: Machine, sample: dict[str, list[int]]) -> tuple:
    """Everything a command could change."""
    devices = []
    for name, v in m.virtio.items():
        d, drv = v.device, v.driver
        devices.append((name, d.requested_size, d.plugged_size, d.usable_region_size, d.busy, d.broken,
                        dict(d.violations), tuple(device_plugged(v)), tuple(drv.plugged_ranges()),
                        drv.plugged_size, drv.requested_size, drv.offline_size, drv.unplug_all_required,
                        drv.config_changed, drv.work_pending, drv.broken, drv.unmovable_mb_id,
                        tuple(d.memory.read(off, 8) for off in sample[name])))
    hp = m.hotplug
    blocks = tuple((b, hp.block(b).state, hp.block(b).zone) for b in sorted(hp.blocks))
    return render(m.tree, True), tuple(devices), blocks, hp.high_memory_end


def _within(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in ranges)


def invariants(m: Machine, sample: dict[str, list[int]]) -> list[str]:
    """What holds after every command, failed or not."""
    bad = []
    text = render(m.tree, True)
    if render(parse(text), True) != text:
        bad.append("proc/iomem does not re-parse to the same text")
    for name, v in m.virtio.items():
        d, drv = v.device, v.driver
        dev_view, drv_view = device_plugged(v), drv.plugged_ranges()
        if dev_view != drv_view:
            bad.append(f"{name}: device bitmap {_hex(dev_view)} != driver's plugged ranges {_hex(drv_view)}")
        total = sum(e - s for s, e in dev_view)
        if not total == d.plugged_size == drv.plugged_size:
            bad.append(f"{name}: plugged {total:#x} (bitmap), {d.plugged_size:#x} (device), "
                       f"{drv.plugged_size:#x} (driver)")
        usable_end = d.addr + d.usable_region_size
        if any(e > usable_end for _, e in dev_view):
            bad.append(f"{name}: plugged memory {_hex(dev_view)} beyond the usable region end {usable_end:#x}")
        parent = drv.parent_resource
        added = [(r.start, r.end + 1) for r in (parent.children if parent else []) if r.name == RESOURCE_NAME]
        outside = [(s, e) for s, e in dev_view if not _within(_merge(added), s, e)]
        if outside:
            bad.append(f"{name}: plugged {_hex(outside)} not in any {RESOURCE_NAME!r} resource {_hex(added)}")
        for off in sample[name]:
            if not _within(dev_view, d.addr + off, d.addr + off + 8) and d.memory.read(off, 8) != bytes(8):
                bad.append(f"{name}: unplugged {d.addr + off:#x} holds {d.memory.read(off, 8).hex()}, not zeros")
                break
    return bad


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _hex(ranges) -> str:
    return "[" + ", ".join(f"{s:#x}-{e:#x}" for s, e in ranges) + "]"


class Fuzzer:
    """Runs commands against one machine; `step` returns the outcome and any broken invariants."""

    def __init__(self, m: Machine, draw) -> None:
        self.m = m
        self.draw = draw
        self.control = Control(m)
        self.sample = {name: samples(v) for name, v in m.virtio.items()}
        self.history: list[bytes] = []
        self.tag = 0

    def story(self) -> str:
        """The commands run so far, long ones cut short."""
        return "[" + ", ".join(repr(c) if len(c) <= 80 else f"{c[:60]!r}... ({len(c)} bytes)"
                               for c in self.history) + "]"

    def store_tags(self) -> None:
        """A guest CPU stores distinct words into some plugged sample offsets."""
        for name, v in self.m.virtio.items():
            d, plugged = v.device, device_plugged(v)
            for off in self.sample[name]:
                if _within(plugged, d.addr + off, d.addr + off + 8) and self.draw.coin(0.3):
                    self.tag += 1
                    d.guest_write(d.addr + off, (self.tag | 1 << 63).to_bytes(8, "little"))

    def step(self) -> tuple[str, list[str]]:
        if self.draw.coin(0.5):
            self.store_tags()
        cmd = command(self.draw, self.m)
        self.history.append(cmd)
        before = snapshot(self.m, self.sample)
        try:
            result = self.control.execute(cmd)
        except ControlError as e:
            outcome = f"error {errno.errorcode.get(e.errno, e.errno)}"
            bad = [] if snapshot(self.m, self.sample) == before else [f"failed command changed the state: {e}"]
            if e.errno not in LISTED_ERRNOS:
                bad.append(f"errno {outcome} is not one the README lists: {e}")
            if not e.result().startswith(f"error: {errno.errorcode[e.errno]}: ") or "\n" in e.result()[:-1]:
                bad.append(f"result is not one 'error: ERRNO: message' line: {e.result()!r}")
        except Exception as e:  # noqa: BLE001 - any other exception is a finding
            return f"exception {type(e).__name__}", [f"{type(e).__name__}: {e}"]
        else:
            outcome = result.split("\n", 1)[0].split(":", 1)[0]
            bad = [] if outcome in ("ok", "partial") else [f"result neither ok nor partial: {result!r}"]
            bad += self.did_what_it_says(cmd, result, before)
        bad += invariants(self.m, self.sample)
        return outcome, bad

    def did_what_it_says(self, cmd: bytes, result: str, before: tuple) -> list[str]:
        words = cmd.decode().split()
        if words == ["help"] or len(words) < 2:
            return [] if before == snapshot(self.m, self.sample) else ["help changed the state"]
        v = self.m.device(words[0])
        assert v is not None
        d = v.device
        if words[1] == "unplug-all":
            return [] if d.plugged_size == 0 else [f"unplug-all left {d.plugged_size:#x} plugged"]
        if words[1] == "requested-size":
            return [] if d.requested_size == parse_size(words[2]) else ["requested-size not taken"]
        addr, size = parse_addr(words[2]), parse_size(words[3])
        now = device_plugged(v)
        if words[1] == "plug" and not _within(now, addr, addr + size):
            return [f"plug {addr:#x}+{size:#x} succeeded but the range is not plugged: {_hex(now)}"]
        if words[1] == "unplug" and any(s < addr + size and addr < e for s, e in now):
            return [f"unplug {addr:#x}+{size:#x} succeeded but some of it is plugged: {_hex(now)}"]
        return []


# -- the suite: control ------------------------------------------------------------------------------


# No shrinking: a sequence of commands shrinks slowly (minutes); the message lists every command run.
@pytest.mark.parametrize("machine", MACHINES)
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_control_commands_keep_the_model_consistent(machine, data):
    fz = Fuzzer(MACHINES[machine](), HypothesisDraw(data))
    for _ in range(data.draw(st.integers(1, 30), label="commands")):
        outcome, bad = fz.step()
        assert not bad, f"{machine}: after {fz.story()}: {outcome}: {bad}"


# -- the suite: the iomem parser -----------------------------------------------------------------------


def check_parse(text: str, bad_line: int | None = None) -> None:
    """parse(text) round-trips or names a line (`bad_line` when the generator knows which)."""
    t0 = time.monotonic()
    try:
        tree = parse(text)
    except IomemParseError as e:
        lines = text.count("\n") + (not text.endswith("\n"))
        assert 1 <= e.lineno <= max(lines, 1), (e.lineno, lines, str(e))
        assert str(e).startswith(f"line {e.lineno}: "), str(e)
        assert bad_line in (None, e.lineno), f"expected an error on line {bad_line}, got {e}"
    else:
        assert bad_line is None, f"line {bad_line} is malformed but the text parsed"
        assert render(tree, True) == text
    assert time.monotonic() - t0 < 2, f"parse took {time.monotonic() - t0:.1f} s for {len(text)} characters"


HEXISH = "0123456789abcdefABCDEF -:\n x\r\t"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(HEXISH) | st.characters(), max_size=300))
def test_iomem_parser_on_random_text(text):
    check_parse(text)


def _hexword(v: int) -> str:
    return f"{v:08x}"


@st.composite
def iomem_lines(draw):
    """Lines as r_show() prints them, some broken on purpose: (text, the first line parse must refuse)."""
    n = draw(st.integers(1, 20))
    lines, depth, first_bad = [], -1, None
    for i in range(1, n + 1):
        d = draw(st.integers(0, min(depth + 1, MAX_IORES_LEVEL)))
        start = draw(st.integers(0, U64 - 1) | st.integers(0, 0xFFFFFFFF) | st.just(0))
        end = draw(st.integers(start, U64 - 1) | st.integers(0, U64 - 1))
        name = draw(st.text(st.characters(blacklist_characters="\n"), max_size=12)
                    | st.sampled_from(["System RAM", "Reserved", "<BAD>", "", " : ", "PCI Bus 0000:00", "a\rb"]))
        indent, s_hex, e_hex, sep = "  " * d, _hexword(start), _hexword(end), " : "
        fault = draw(st.sampled_from([None] * 12 + ["odd", "deep", "cap", "short", "zero", "long", "upper", "sep",
                                                    "dash", "empty", "trail"]))
        if fault == "odd":
            indent += " "
        elif fault == "deep":
            indent = "  " * (depth + 2)
        elif fault == "cap":
            indent = "  " * (MAX_IORES_LEVEL + 1)
        elif fault == "short":
            s_hex = s_hex.lstrip("0")[-7:] or "0"
        elif fault == "zero":
            e_hex = "0" + e_hex if len(e_hex) == 8 else "0" + e_hex
        elif fault == "long":
            s_hex = "1" + "0" * 16
        elif fault == "upper":
            e_hex = "A" + e_hex[1:]
        elif fault == "sep":
            sep, name = draw(st.sampled_from([" :", ": ", ":", " -", "  : ", " ; "])), "x" + name
        if fault == "empty":
            line = ""
        elif fault == "trail":
            line = f"{indent}{s_hex}-{e_hex} :"
        elif fault == "dash":
            line = f"{indent}{s_hex}{e_hex} : {name}"
        else:
            line = f"{indent}{s_hex}-{e_hex}{sep}{name}"
        if fault is None:
            depth = d
        elif first_bad is None:
            first_bad = i
        lines.append(line)
    final = draw(st.sampled_from([True] * 9 + [False])) or lines[-1] == ""   # "a\n" + "" is "a\n"
    text = "\n".join(lines) + ("\n" if final else "")
    if not final and text:
        first_bad = n   # checked before anything else
    return text, first_bad


@settings(max_examples=300, deadline=None)
@given(iomem_lines())
def test_iomem_parser_on_generated_lines(case):
    text, bad_line = case
    check_parse(text, bad_line)


@st.composite
def mutated_dumps(draw):
    text = draw(st.sampled_from(DUMPS + [QEMU_Q35_2G])).read_text()
    lines = text.split("\n")[:-1]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "dedent", "char", "drop-char"]))
        if kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent":
            lines[i] = "  " + lines[i]
        elif kind == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        elif kind == "char" and lines[i]:
            k = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:k] + draw(st.sampled_from(list("0f- :xZ\t"))) + lines[i][k:]
        elif kind == "drop-char" and lines[i]:
            k = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + lines[i][k + 1:]
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(mutated_dumps())
def test_iomem_parser_on_mutated_real_dumps(text):
    check_parse(text)


# -- the long run: scripts/fuzz ----------------------------------------------------------------------------


def long_run(commands: int, seed: int, per_machine: int = 200, show: int = 5) -> int:
    """Run `commands` commands, a fresh machine every `per_machine`, rotating through MACHINES."""
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    violations: list[str] = []
    t0 = time.monotonic()
    names = list(MACHINES)
    fz = None
    machine = ""
    for i in range(commands):
        if i % per_machine == 0:
            machine = names[(i // per_machine) % len(names)]
            fz = Fuzzer(MACHINES[machine](), RandomDraw(rng))
        assert fz is not None
        outcome, bad = fz.step()
        outcomes[outcome] += 1
        if bad:
            violations.append(f"command {i} on {machine} (a fresh machine, then {fz.story()}): {outcome}: {bad}")
            fz = Fuzzer(MACHINES[machine](), RandomDraw(rng))   # go on from a sane machine
    elapsed = time.monotonic() - t0
    ok, partial = outcomes.pop("ok", 0), outcomes.pop("partial", 0)
    print(f"fuzz: seed {seed}, {commands} commands on {len(names)} machines ({', '.join(names)}), "
          f"{elapsed:.1f} s ({commands / max(elapsed, 1e-9):.0f} commands/s)")
    print(f"  ok {ok}, partial {partial}, errors {sum(v for k, v in outcomes.items() if k.startswith('error'))}: "
          + ", ".join(f"{k.split()[1]} {v}" for k, v in sorted(outcomes.items()) if k.startswith("error")))
    others = {k: v for k, v in outcomes.items() if not k.startswith("error")}
    if others:
        print(f"  other outcomes: {others}")
    print(f"  invariant violations: {len(violations)}")
    for text in violations[:show]:
        print(f"    {text}")
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fuzz", description="Fuzz the control language in the model.")
    p.add_argument("commands", nargs="?", type=int, default=10_000, help="how many commands (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--per-machine", type=int, default=200, help="commands before a fresh machine (default 200)")
    args = p.parse_args(argv)
    return long_run(args.commands, args.seed, args.per_machine)


if __name__ == "__main__":
    sys.exit(main())
