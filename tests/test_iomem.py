"""/proc/iomem text (spec section 3): render rules and parse of real dumps."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.kernel.iomem import IomemParseError, parse, render
from memfs.kernel.ioport import Resource
from memfs.kernel.resource import ResourceTree

from conftest import DUMPS as REAL_DUMPS, QEMU_Q35_2G  # noqa: E402
DUMPS = REAL_DUMPS + [QEMU_Q35_2G]


def zeroed(text: str) -> str:
    """What an unprivileged reader sees (spec 3.2), derived from the text alone."""
    return re.sub(r"^( *)[0-9a-f]+-[0-9a-f]+ : ", r"\g<1>00000000-00000000 : ", text, flags=re.M)


def test_there_are_dumps_to_check():
    assert len(DUMPS) == 26


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.name)
def test_real_dump_round_trips_byte_for_byte(path):
    text = path.read_text()
    tree = parse(text)
    assert render(tree, privileged=True) == text
    assert render(tree, privileged=False) == zeroed(text)


def test_render_format_rules_of_spec_3():
    t = ResourceTree()
    chain = []
    parent = t.root
    for depth in range(7):  # Bus -> ... -> 7th level: capped at 10 spaces
        r = Resource(0x100000000, 0x13FFFFFFF - depth, f"L{depth}")
        t.insert_resource(r, parent)
        chain.append(r)
        parent = r
    t.insert_resource(Resource(0, 0xFFF, None))
    t.insert_resource(Resource(0x3280000000, 0x32FFFFFFFF, ""))
    out = render(t, privileged=True).splitlines()
    assert out[0] == "00000000-00000fff : <BAD>"
    assert [len(line) - len(line.lstrip(" ")) for line in out[1:8]] == [0, 2, 4, 6, 8, 10, 10]
    assert out[1] == "100000000-13fffffff : L0"
    assert out[-1] == "3280000000-32ffffffff : "
    assert render(t, privileged=False).splitlines()[1] == "00000000-00000000 : L0"


def test_parse_nests_capped_lines_by_containment():
    text = ("".join(f"{'  ' * d}{0x1000:08x}-{0x1fff - d:08x} : d{d}\n" for d in range(6))
            + "          00001100-000011ff : deeper\n"
            + "          00001800-000018ff : sibling-of-deeper\n")
    tree = parse(text)
    d5 = tree.lookup(0x1000)[5]
    assert d5.name == "d5"
    assert [c.name for c in d5.children] == ["deeper", "sibling-of-deeper"]
    assert render(tree, True) == text


@pytest.mark.parametrize("text,lineno,why", [
    ("00000000-00000fff : a\n  0000zzzz-00001fff : b\n", 2, "START-END"),
    ("00000000-00000fff : a\n    00001000-00001fff : b\n", 2, "more than one level"),
    ("00000000-00000fff : a\n 00001000-00001fff : b\n", 2, "odd indentation"),
    ("0000-0fff : a\n", 1, "as the kernel prints it"),
    ("00000000-00000fff: a\n", 1, "START-END"),
    ("00000000-00000fff : a", 1, "final newline"),
])
def test_malformed_line_is_named_by_number(text, lineno, why):
    with pytest.raises(IomemParseError) as e:
        parse(text)
    assert e.value.lineno == lineno
    assert f"line {lineno}" in str(e.value) and why in str(e.value)


names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=12)


@st.composite
def dumps(draw, depth=0):
    """Random /proc/iomem text: any addresses and names, nesting at most one level deeper per line."""
    out = []
    for _ in range(draw(st.integers(0, 3 if depth < 6 else 0))):
        start = draw(st.integers(0, (1 << 64) - 1))
        end = draw(st.integers(0, (1 << 64) - 1))
        out.append(f"{'  ' * min(depth, 5)}{start:08x}-{end:08x} : {draw(names)}\n")
        out.append(draw(dumps(depth + 1)))
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(dumps())
def test_render_of_parse_is_identity(text):
    assert render(parse(text), True) == text
