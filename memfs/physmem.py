"""Memory contents: sparse, mmap-backed byte stores.

A store is split into fixed chunks; a chunk gets an anonymous mmap only when
first written, so untouched memory reads as zeros and costs nothing, and a
1 TiB machine mounts in a few MB. `discard` is what QEMU's
ram_block_discard_range() does for anonymous RAM (MADV_DONTNEED): the pages
read as zeros afterwards and their RSS goes back to the host.
"""
from __future__ import annotations

import mmap
from collections.abc import Iterator

CHUNK_SHIFT = 26  # 64 MiB: few mmaps for big machines, cheap to drop whole
CHUNK = 1 << CHUNK_SHIFT
_PAGE = mmap.PAGESIZE


class SparseMemory:
    """`size` bytes of zero-initialised, writable memory."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"memory size must be positive, not {size}")
        self.size = size
        self._chunks: dict[int, mmap.mmap] = {}

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset:#x}, +{length:#x}) is outside a store of {self.size:#x} bytes")

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, offset in chunk, length) pieces of a range."""
        end = offset + length
        while offset < end:
            idx = offset >> CHUNK_SHIFT
            inner = offset & (CHUNK - 1)
            n = min(CHUNK - inner, end - offset)
            yield idx, inner, n
            offset += n

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length and (offset >> CHUNK_SHIFT) == ((offset + length - 1) >> CHUNK_SHIFT):
            chunk = self._chunks.get(offset >> CHUNK_SHIFT)
            inner = offset & (CHUNK - 1)
            return bytes(length) if chunk is None else chunk[inner:inner + length]
        out = bytearray(length)
        pos = 0
        for idx, inner, n in self._spans(offset, length):
            chunk = self._chunks.get(idx)
            if chunk is not None:
                out[pos:pos + n] = chunk[inner:inner + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        pos = 0
        for idx, inner, n in self._spans(offset, len(data)):
            chunk = self._chunks.get(idx)
            if chunk is None:
                # private: MADV_DONTNEED on shared anonymous memory would keep the data
                chunk = self._chunks[idx] = mmap.mmap(-1, min(CHUNK, self.size - (idx << CHUNK_SHIFT)),
                                                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            chunk[inner:inner + n] = view[pos:pos + n]
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Drop the contents of a range: zeros on the next read, memory given back."""
        self._check(offset, length)
        for idx, inner, n in self._spans(offset, length):
            chunk = self._chunks.get(idx)
            if chunk is None:
                continue
            if inner == 0 and n == len(chunk):
                del self._chunks[idx]
                chunk.close()
                continue
            # madvise needs page alignment; zero the unaligned edges by hand.
            lo = -(-inner // _PAGE) * _PAGE
            hi = (inner + n) // _PAGE * _PAGE
            if lo < hi:
                chunk.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                chunk[inner:lo] = bytes(lo - inner)
                chunk[hi:inner + n] = bytes(inner + n - hi)
            else:
                chunk[inner:inner + n] = bytes(n)

    def resident_chunks(self) -> int:
        """How many chunks hold an mmap (a test and benchmark aid)."""
        return len(self._chunks)
