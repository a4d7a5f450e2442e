"""The journal's file format: one checksummed JSON line per input, and durable writes."""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

from .loader import MachineError


class BackingError(MachineError):
    """A backing dir that cannot be used (another machine's, in use, damaged); nothing was changed."""


class JournalError(OSError):
    """The journal could not record an input: it was not applied."""


def encode(entry: dict[str, Any]) -> bytes:
    """One journal line: JSON, a space, its CRC-32, a newline."""
    payload = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    return payload + b" %08x\n" % zlib.crc32(payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The entry of one line (without its newline), or None if it does not check out."""
    payload, sep, crc = line.rpartition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        entry = json.loads(payload)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def read_journal(data: bytes, where: str) -> tuple[list[bytes], list[dict[str, Any]], int]:
    """The good lines of a journal's bytes, their entries, and how many bytes after them are torn.

    A crash can only tear the end: a bad line followed by a good one is damage.
    """
    lines: list[bytes] = []
    entries: list[dict[str, Any]] = []
    pos = 0
    bad_at: int | None = None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        entry = decode(data[pos:end - 1]) if nl >= 0 else None
        if entry is None:
            if bad_at is None:
                bad_at = pos
        elif bad_at is not None:
            raise BackingError(f"{where}: line {len(lines) + 1} is damaged but later lines are not "
                               "(not a torn last write): refusing to guess the state")
        else:
            lines.append(data[pos:end])
            entries.append(entry)
        pos = end
    return lines, entries, 0 if bad_at is None else len(data) - bad_at


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
