"""memfs.units: sizes and addresses as people write them, and every way to get them wrong."""
from __future__ import annotations

import pytest

from memfs.units import parse_addr, parse_size

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
TOP = (1 << 64) - 1

SIZES = [
    ("4096", 4096),
    ("0", 0),
    ("0x1000", 0x1000),
    ("0X1000", 0x1000),
    ("0xABCdef", 0xABCDEF),
    ("0x0010", 0x10),  # leading zeros are harmless in hex
    ("0x10E", 0x10E),  # E is a hex digit, not a unit
    ("  2M\n", 2 * MIB),
    ("1K", KIB), ("1k", KIB), ("512M", 512 * MIB), ("3g", 3 * GIB), ("1T", TIB),
    ("2KiB", 2 * KIB), ("2MiB", 2 * MIB), ("2mib", 2 * MIB), ("2GB", 2 * GIB), ("2gb", 2 * GIB), ("1TiB", TIB),
    ("0x10G", 16 * GIB), ("0x10g", 16 * GIB),
    ("16777215T", 16777215 * TIB),
    ("18446744073709551615", TOP),
    ("0xffffffffffffffff", TOP),
    (0, 0), (4096, 4096), (TOP, TOP),
]

ADDRS = [
    ("0", 0),
    ("4096", 4096),
    ("0x100000000", 1 << 32),
    ("0X100000000", 1 << 32),
    (" 0xfed00000 ", 0xFED00000),
    ("0xffffffffffffffff", TOP),
    ("18446744073709551615", TOP),
    (0, 0), (1 << 40, 1 << 40), (TOP, TOP),
]


@pytest.mark.parametrize("text,value", SIZES, ids=repr)
def test_good_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,value", ADDRS, ids=repr)
def test_good_addresses(text, value):
    assert parse_addr(text) == value


# (input, what the message must say): one row per class of bad input, for sizes ...
BAD_SIZES = [
    ("", "empty"),
    ("   ", "empty"),
    ("-1", "negative"),
    ("-0x10", "negative"),
    ("+5", "no sign allowed"),
    ("1 G", "no spaces allowed"),
    ("1_000", "no underscores allowed"),
    ("0o17", "octal and binary prefixes are not accepted"),
    ("0b101", "octal and binary prefixes are not accepted"),
    ("010", "leading zero (C would read it as octal); write 10 or 0x10 if hex is meant"),
    ("0009M", "leading zero"),
    ("0x", "0x without hex digits"),
    ("0xZZ", "0x without hex digits"),
    ("1.5G", "not a whole number; use a smaller unit (1536M, not 1.5G)"),
    ("1,5G", "not a whole number"),
    ("5P", "unknown unit 'P' (known: K, M, G, T"),
    ("0x10Q", "unknown unit 'Q'"),
    ("1KK", "unknown unit 'KK'"),
    ("2MiBs", "unknown unit 'MiBs'"),
    ("1e6", "expected bytes (4096), hex (0x1000) or a number with a unit K, M, G or T (512M)"),
    ("ten", "expected bytes"),
    ("16777216T", "does not fit in 64 bits (at most 0xffffffffffffffff = 18446744073709551615)"),
    ("18446744073709551616", "does not fit in 64 bits"),
    ("0x10000000000000000", "does not fit in 64 bits"),
    ("0x8000000000000000K", "does not fit in 64 bits"),
    ("9" * 5000, "does not fit in 64 bits"),
    ("0x" + "f" * 5000, "does not fit in 64 bits"),
    (-1, "negative"),
    (1 << 64, "does not fit in 64 bits"),
    (True, "expected an integer or a string, not bool"),
    (1.5, "expected an integer or a string, not float"),
    (None, "expected an integer or a string, not NoneType"),
]

# ... and for addresses, which take no unit
BAD_ADDRS = [
    ("", "empty"),
    ("-4096", "negative"),
    ("+0x10", "no sign allowed"),
    ("0x 10", "no spaces allowed"),
    ("0x_10", "no underscores allowed"),
    ("0o777", "octal and binary prefixes are not accepted"),
    ("0100", "leading zero"),
    ("0x", "0x without hex digits"),
    ("0xg", "0x without hex digits"),
    ("4.5", "not a whole number; expected hex (0x1000) or decimal (4096)"),
    ("4G", "an address takes no unit ('G')"),
    ("0x1000K", "an address takes no unit ('K')"),
    ("fed00000", "expected hex (0x1000) or decimal (4096)"),
    ("0x10000000000000000", "does not fit in 64 bits"),
    ("18446744073709551616", "does not fit in 64 bits"),
    (1 << 64, "does not fit in 64 bits"),
    (-1, "negative"),
    (False, "not bool"),
]


@pytest.mark.parametrize("text,message", BAD_SIZES, ids=lambda v: repr(v)[:30])
def test_bad_sizes_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as e:
        parse_size(text, "region_size")
    assert str(e.value).startswith("bad region_size ")
    assert message in str(e.value)
    assert len(str(e.value)) < 200  # a 5000-digit input is not echoed back whole


@pytest.mark.parametrize("text,message", BAD_ADDRS, ids=lambda v: repr(v)[:30])
def test_bad_addresses_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as e:
        parse_addr(text, "range start")
    assert str(e.value).startswith("bad range start ")
    assert message in str(e.value)


def test_default_names_in_messages():
    with pytest.raises(ValueError, match=r"^bad size 'x': "):
        parse_size("x")
    with pytest.raises(ValueError, match=r"^bad address 'x': "):
        parse_addr("x")


@pytest.mark.parametrize("unit,scale", [("K", KIB), ("M", MIB), ("G", GIB), ("T", TIB)])
def test_units_are_binary_at_the_64_bit_edge(unit, scale):
    largest = TOP // scale
    assert parse_size(f"{largest}{unit}") == largest * scale
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        parse_size(f"{largest + 1}{unit}")
