"""Sizes and addresses as people write them: 512M, 0x100000000, 4096.

| form | `parse_size` | `parse_addr` |
|---|---|---|
| decimal: `4096`, `0` | bytes | address |
| hex: `0x1000`, `0X1000` | bytes | address |
| either, with a binary unit `K` `M` `G` `T` (any case, optionally followed by `iB` or `B`): `512M`, `2MiB`, `0x10g` | times 2^10 ... 2^40 | refused |
| an `int` (from a TOML file) | itself | itself |

Both return 0 ... 2^64-1 (what a 64-bit `resource_size_t` holds). Anything else is a
ValueError that says what is wrong with it: empty, negative, a sign, underscores, octal or
binary prefixes, a leading zero (`010` is octal to C), fractions, unknown units, trailing
text, a boolean, or a value that does not fit in 64 bits.
"""
from __future__ import annotations

import re

from .kernel.sizes import SZ_1G, SZ_1K, SZ_1M, SZ_1T

U64_MAX = (1 << 64) - 1
UNITS = {"K": SZ_1K, "M": SZ_1M, "G": SZ_1G, "T": SZ_1T}

_NUMBER = r"(?P<number>0[xX][0-9a-fA-F]+|[0-9]+)"
_SIZE = re.compile(_NUMBER + r"(?:(?P<unit>[KMGTkmgt])(?:iB|ib|IB|Ib|B|b)?)?")
_ADDR = re.compile(_NUMBER)
_NUMBER_THEN = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]+)(?P<rest>.+)")


def parse_size(text: str | int, what: str = "size") -> int:
    """A size in bytes: decimal or 0x hex, optionally times a binary unit K/M/G/T."""
    return _parse(text, what, _SIZE)


def parse_addr(text: str | int, what: str = "address") -> int:
    """A physical address: decimal or 0x hex."""
    return _parse(text, what, _ADDR)


def _parse(text: str | int, what: str, pattern: re.Pattern[str]) -> int:
    if not isinstance(text, str):
        return _checked_int(text, what)
    word = text.strip()
    m = pattern.fullmatch(word)
    if m is None:
        raise ValueError(f"bad {what} {_shown(text)}: {_why(word, sizes=pattern is _SIZE)}")
    unit = m.groupdict().get("unit")
    value = _number(m.group("number"), text, what) * (UNITS[unit.upper()] if unit else 1)
    if value > U64_MAX:
        raise _too_big(text, what)
    return value


def _checked_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"bad {what} {_shown(value)}: expected an integer or a string, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"bad {what} {_shown(value)}: negative")
    if value > U64_MAX:
        raise _too_big(value, what)
    return value


def _number(digits: str, text: str, what: str) -> int:
    hexadecimal = digits[:2] in ("0x", "0X")
    if not hexadecimal and len(digits) > 1 and digits[0] == "0":
        raise ValueError(f"bad {what} {_shown(text)}: leading zero (C would read it as octal); "
                         f"write {digits.lstrip('0') or '0'} or 0x{digits.lstrip('0') or '0'} if hex is meant")
    if len(digits.lstrip("0xX")) > 20:  # more digits than any 64-bit value has; spare int() the work
        raise _too_big(text, what)
    return int(digits, 16 if hexadecimal else 10)


def _shown(text: object) -> str:
    """repr() of the input, cut short: an error message quotes it, and it may be a page long."""
    r = repr(text)
    return r if len(r) <= 40 else r[:36] + "...'"


def _too_big(text: object, what: str) -> ValueError:
    return ValueError(f"bad {what} {_shown(text)}: does not fit in 64 bits (at most {U64_MAX:#x} = {U64_MAX})")


def _why(word: str, sizes: bool) -> str:
    """What is wrong with a word that is not a size (or address)."""
    expected = ("expected bytes (4096), hex (0x1000) or a number with a unit K, M, G or T (512M)" if sizes
                else "expected hex (0x1000) or decimal (4096)")
    if not word:
        return "empty; " + expected
    if word[0] == "-":
        return "negative"
    if word[0] == "+":
        return "no sign allowed; " + expected
    if any(c.isspace() for c in word):
        return "no spaces allowed; " + expected
    if "_" in word:
        return "no underscores allowed; " + expected
    if word[:2] in ("0o", "0O", "0b", "0B"):
        return "octal and binary prefixes are not accepted; " + expected
    if re.fullmatch(r"0[xX](?![0-9a-fA-F]).*", word):
        return "0x without hex digits; " + expected
    m = _NUMBER_THEN.fullmatch(word)
    if m is None:
        return expected
    rest = m.group("rest")
    if rest[0] in ".,":
        return "not a whole number; " + ("use a smaller unit (1536M, not 1.5G)" if sizes else expected)
    if not rest.isalpha():
        return expected
    if not sizes:
        return f"an address takes no unit ({_shown(rest)}); " + expected
    return f"unknown unit {_shown(rest)} (known: K, M, G, T, each optionally followed by iB or B)"
