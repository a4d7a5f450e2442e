"""Sparse memory: zeros until written, discard gives zeros and memory back."""
from __future__ import annotations


from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.physmem import CHUNK, SparseMemory

MIB = 1 << 20


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def test_huge_store_costs_nothing_until_written():
    mem = SparseMemory(1 << 40)
    assert mem.read((1 << 40) - 16, 16) == bytes(16)
    mem.write((1 << 40) - 3, b"end")
    assert mem.read((1 << 40) - 4, 4) == b"\0end"
    assert mem.resident_chunks() == 1


def test_discard_zeroes_and_returns_memory():
    mem = SparseMemory(4 * CHUNK)
    base = rss_kib()
    mem.write(CHUNK - MIB, b"\x5a" * (64 * MIB))  # spans two chunks
    grown = rss_kib()
    assert grown - base > 60 * 1024
    mem.discard(CHUNK - MIB + 10, 64 * MIB - 20)  # unaligned edges
    assert mem.read(CHUNK - MIB, 10) == b"\x5a" * 10
    assert mem.read(CHUNK - MIB + 10, 64 * MIB - 20) == bytes(64 * MIB - 20)
    assert mem.read(CHUNK - MIB + 64 * MIB - 10, 10) == b"\x5a" * 10
    assert grown - rss_kib() > 60 * 1024


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["w", "d"]), st.integers(0, 3 * CHUNK), st.integers(0, 3 * 4096)),
                max_size=20))
def test_matches_a_plain_bytearray(ops):
    size = 3 * CHUNK + 4 * 4096
    mem = SparseMemory(size)
    model = {}  # offset -> byte, sparse reference
    for i, (op, off, n) in enumerate(ops):
        if op == "w":
            data = bytes([(i * 7 + j) % 251 + 1 for j in range(n)])
            mem.write(off, data)
            model.update({off + j: data[j] for j in range(n)})
        else:
            mem.discard(off, n)
            for j in range(off, off + n):
                model.pop(j, None)
    for off in {o for o in model} | {0, size - 1}:
        assert mem.read(off, 1)[0] == model.get(off, 0)


def test_a_view_costs_no_copy_and_a_held_view_never_blocks_a_discard():
    mem = SparseMemory(4 * CHUNK)
    mem.write(CHUNK + 10, b"abcdef")
    view = mem.view(CHUNK + 10, 6)
    assert isinstance(view, memoryview) and view == b"abcdef"
    mem.write(CHUNK + 10, b"X")                      # a view sees later stores: it is for replies sent at once
    assert bytes(view) == b"Xbcdef"
    assert mem.view(0, 4) == bytes(4) and isinstance(mem.view(0, 4), bytes)      # nothing stored there
    across = mem.view(CHUNK - 2, 14)                 # two chunks: a copy
    assert isinstance(across, bytes) and across == bytes(12) + b"Xb"
    mem.discard(CHUNK, CHUNK)                        # the whole chunk goes while the view is held
    assert mem.read(CHUNK + 10, 6) == bytes(6)
    assert bytes(view) == b"Xbcdef"                  # still mapped until let go
    del view
