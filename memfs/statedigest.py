"""A digest of the model state: what the machine's future behaviour depends on.

Used by the journal (memfs/journal.py) to notice that the machine is back in
a state it had before. Memory contents, derived caches and diagnostics are
left out; a value the digest cannot see makes it answer None.
"""
from __future__ import annotations

import collections
import enum
import functools
import hashlib
import logging
import types
from typing import Any

from .audit import Audit
from .changes import MemoryChanged
from .firmware import Firmware
from .machine import Machine
from .physmem import SparseMemory


log = logging.getLogger("memfs.journal")


# -- the digest of the model state -------------------------------------------------------------

class _Opaque(Exception):
    """The model holds a value whose state the digest cannot see: no compaction."""


# Derived caches (rebuilt from what they cache), counters that only tell caches to
# rebuild, and diagnostics: none of them decides what the model does next.
_SKIP_ATTRS = {
    ("Machine", "description"), ("Machine", "journal"), ("Machine", "stores"),
    ("ResourceTree", "generation"), ("Resource", "_ix"),
    ("Bus", "_map"), ("Bus", "_generation"),
    ("DevMem", "_generation"), ("DevMem", "_policy"), ("DevMem", "_memblock"),
    ("VirtioMemDriver", "log"), ("VirtioMemDevice", "violations"),
}
# Memory contents (the files hold them), fixed firmware, wiring (listeners, callbacks).
_SKIP_TYPES: tuple[type, ...] = (
    SparseMemory, Firmware, Audit, MemoryChanged, types.FunctionType, types.MethodType,
    types.BuiltinFunctionType, types.BuiltinMethodType, functools.partial,
)
_VALUES = (bool, int, float, str, type(None))


def state_digest(machine: Machine) -> bytes | None:
    """A digest of everything the model's future behaviour depends on; None if some part is opaque.

    Equal digests mean equal states: the same inputs from there on do the same.
    Order, sharing and types all count, so a difference that may not matter
    still tells states apart (the safe way round: a cycle missed, never one
    made up). Set elements are hashed sorted: the model's results do not
    depend on set order (they could not be replayed if they did).
    """
    h = hashlib.blake2b(digest_size=20)
    try:
        _walk(machine, h, {})
    except (_Opaque, RecursionError) as e:
        log.warning("model state not digestable (%s): the journal is not compacted", e)
        return None
    return h.digest()


def _walk(obj: object, h: Any, memo: dict[int, int]) -> None:
    t = type(obj)
    if t in _VALUES:
        h.update(f"{t.__name__}:{obj!r};".encode())
        return
    if t is bytes or t is bytearray:
        assert isinstance(obj, (bytes, bytearray))
        h.update(f"{t.__name__}:{len(obj)}:".encode())
        h.update(obj)
        return
    if isinstance(obj, _SKIP_TYPES):
        h.update(b"-;")
        return
    if isinstance(obj, enum.Enum):
        h.update(f"{t.__qualname__}.{obj.name};".encode())
        return
    seen = memo.get(id(obj))
    if seen is not None:
        h.update(f"@{seen};".encode())
        return
    memo[id(obj)] = len(memo)
    h.update(f"{t.__module__}.{t.__qualname__}".encode())
    # Containers (and their subclasses: a SortedDict's items are not in its __dict__)...
    if isinstance(obj, (list, tuple, collections.deque)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _walk(item, h, memo)
        h.update(b"]")
    elif isinstance(obj, dict):
        h.update(f"{{{len(obj)}".encode())
        for key, value in obj.items():
            _walk(key, h, memo)
            _walk(value, h, memo)
        h.update(b"}")
    elif isinstance(obj, (set, frozenset)):
        try:
            items = sorted(obj)
        except TypeError:
            raise _Opaque(f"a {t.__name__} of unorderable values") from None
        h.update(f"{{{len(items)}".encode())
        for item in items:
            _walk(item, h, memo)
        h.update(b"}")
    elif t is range or isinstance(obj, (int, float, complex, str, bytes, bytearray)):
        h.update(f"{obj!r};".encode())   # a range, or the value of a subclass of a value type
    elif t is not object and not hasattr(obj, "__dict__") and not getattr(t, "__slots__", None):
        raise _Opaque(f"a {t.__module__}.{t.__qualname__}")
    # ...then the attributes of any object (a plain object() has none: an identity token).
    fields = dict(getattr(obj, "__dict__", {}))
    for klass in t.__mro__:
        slots = getattr(klass, "__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                fields[slot] = getattr(obj, slot)
    h.update(b"(")
    for name in sorted(fields):
        value = fields[name]
        if (t.__name__, name) in _SKIP_ATTRS or isinstance(value, _SKIP_TYPES):
            continue  # so that adding a listener or a cache is no change of state
        h.update(f"{name}=".encode())
        _walk(value, h, memo)
    h.update(b")")


