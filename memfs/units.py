"""Sizes and addresses as people write them: 512M, 0x100000000, 4096."""
from __future__ import annotations

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Plain bytes, hex, or a number with a binary K/M/G/T suffix (optionally followed by 'iB' or 'B')."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        word = str(text).strip()
        for tail in ("iB", "B"):
            if len(word) > 1 and word[-len(tail) - 1:-len(tail)].upper() in _SUFFIX and word.endswith(tail):
                word = word[:-len(tail)]
        scale = _SUFFIX.get(word[-1:].upper(), 1) if word else 1
        digits = word[:-1] if scale > 1 else word
        try:
            value = int(digits, 0) * scale
        except ValueError:
            raise ValueError(f"bad {what} {text!r}: expected bytes, 0x... or a number with K/M/G/T") from None
    if value < 0:
        raise ValueError(f"bad {what} {text!r}: negative")
    return value


def parse_addr(text: str | int, what: str = "address") -> int:
    """Hex (0x...) or decimal."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        try:
            value = int(str(text).strip(), 0)
        except ValueError:
            raise ValueError(f"bad {what} {text!r}: expected hex (0x...) or decimal") from None
    if not 0 <= value < 1 << 64:
        raise ValueError(f"bad {what} {text!r}: outside the 64-bit address space")
    return value
