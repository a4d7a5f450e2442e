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
