"""Memory contents: sparse, mmap-backed byte stores.

A store is split into fixed chunks; a chunk gets an mmap only when first
written, so untouched memory reads as zeros and costs nothing, and a 1 TiB
machine mounts in a few MB. `discard` is what QEMU's
ram_block_discard_range() does: the pages read as zeros afterwards and
their memory goes back to the host.

Two kinds of store, handed out by a `Stores`:

* `SparseMemory`: anonymous private mmaps (QEMU's memory-backend-ram).
  Discard is MADV_DONTNEED, which frees and zeroes private anonymous pages.
* `FileMemory`: one sparse file per chunk under a directory, mapped
  MAP_SHARED (QEMU's memory-backend-file, share=on). What is stored lives in
  the page cache of those files, so a daemon killed with SIGKILL loses
  nothing already stored. Discard punches holes (MADV_REMOVE, which is
  fallocate(PUNCH_HOLE) on the mapped file), or removes a whole chunk's file.
  A store may be opened *frozen*: writes and discards are ignored and nothing
  is mapped until `thaw()`, so a machine can be rebuilt over existing files
  (recovery, memfs.journal) without the rebuild touching what they hold.
"""
from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

CHUNK_SHIFT = 26  # 64 MiB: few mmaps for big machines, cheap to drop whole
CHUNK = 1 << CHUNK_SHIFT
FILE_CHUNK_SHIFT = 30  # 1 GiB per file: each mapping holds a descriptor (Python's mmap dups it)
_PAGE = mmap.PAGESIZE


def _close(chunk: mmap.mmap) -> None:
    """Unmap a chunk no longer in the store; a view() still held keeps it mapped until let go."""
    try:
        chunk.close()
    except BufferError:
        pass


class SparseMemory:
    """`size` bytes of zero-initialised, writable memory (anonymous, private)."""

    def __init__(self, size: int, chunk_shift: int = CHUNK_SHIFT) -> None:
        if size <= 0:
            raise ValueError(f"memory size must be positive, not {size}")
        self.size = size
        self._shift = chunk_shift
        self._chunk = 1 << chunk_shift
        self._chunks: dict[int, mmap.mmap] = {}

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset:#x}, +{length:#x}) is outside a store of {self.size:#x} bytes")

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, offset in chunk, length) pieces of a range."""
        end = offset + length
        while offset < end:
            idx = offset >> self._shift
            inner = offset & (self._chunk - 1)
            n = min(self._chunk - inner, end - offset)
            yield idx, inner, n
            offset += n

    def _chunk_len(self, idx: int) -> int:
        return min(self._chunk, self.size - (idx << self._shift))

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        shift = self._shift
        if length and (offset >> shift) == ((offset + length - 1) >> shift):
            chunk = self._chunks.get(offset >> shift)
            inner = offset & (self._chunk - 1)
            return bytes(length) if chunk is None else chunk[inner:inner + length]
        out = bytearray(length)
        pos = 0
        for idx, inner, n in self._spans(offset, length):
            chunk = self._chunks.get(idx)
            if chunk is not None:
                out[pos:pos + n] = chunk[inner:inner + n]
            pos += n
        return bytes(out)

    def view(self, offset: int, length: int) -> bytes | memoryview:
        """read() without the copy where the range lies in one stored chunk: a view of it, which
        sees later stores. For a reply sent at once (a FUSE read); whoever keeps data copies it."""
        shift = self._shift
        chunk = self._chunks.get(offset >> shift)
        if chunk is None or not length or (offset >> shift) != ((offset + length - 1) >> shift):
            return self.read(offset, length)
        self._check(offset, length)
        inner = offset & (self._chunk - 1)
        return memoryview(chunk)[inner:inner + length]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        pos = 0
        for idx, inner, n in self._spans(offset, len(data)):
            chunk = self._chunks.get(idx)
            if chunk is None:
                chunk = self._chunks[idx] = self._new_chunk(idx)
            chunk[inner:inner + n] = view[pos:pos + n]
            pos += n

    def _new_chunk(self, idx: int) -> mmap.mmap:
        # private: MADV_DONTNEED on shared anonymous memory would keep the data
        return mmap.mmap(-1, self._chunk_len(idx), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _drop_chunk(self, idx: int, chunk: mmap.mmap) -> None:
        del self._chunks[idx]
        _close(chunk)

    def _free_pages(self, chunk: mmap.mmap, start: int, length: int) -> None:
        """Zero page-aligned [start, start+length) of a chunk and give its memory back."""
        chunk.madvise(mmap.MADV_DONTNEED, start, length)

    def discard(self, offset: int, length: int) -> None:
        """Drop the contents of a range: zeros on the next read, memory given back."""
        self._check(offset, length)
        for idx, inner, n in self._spans(offset, length):
            chunk = self._chunks.get(idx)
            if chunk is None:
                continue
            if inner == 0 and n == len(chunk):
                self._drop_chunk(idx, chunk)
                continue
            # madvise needs page alignment; zero the unaligned edges by hand.
            lo = -(-inner // _PAGE) * _PAGE
            hi = (inner + n) // _PAGE * _PAGE
            if lo < hi:
                self._free_pages(chunk, lo, hi - lo)
                chunk[inner:lo] = bytes(lo - inner)
                chunk[hi:inner + n] = bytes(inner + n - hi)
            else:
                chunk[inner:inner + n] = bytes(n)

    def resident_chunks(self) -> int:
        """How many chunks hold an mmap (a test and benchmark aid)."""
        return len(self._chunks)


class FileMemory(SparseMemory):
    """`size` bytes kept in sparse chunk files under `directory`, mapped MAP_SHARED.

    Chunk i is the file named by its offset in the store, 16 hex digits
    (`0000000100000000` holds [4 GiB, 5 GiB)), FILE_CHUNK bytes long (the
    last one shorter), created on the first write to it. Existing files are
    the store's contents: opening a store over them resumes it.
    """

    def __init__(self, size: int, directory: str, frozen: bool = False) -> None:
        super().__init__(size, FILE_CHUNK_SHIFT)
        self.directory = directory
        self.frozen = frozen
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not frozen:
            self._map_existing()

    def _path(self, idx: int) -> str:
        return os.path.join(self.directory, f"{idx << self._shift:016x}")

    def _map_existing(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            try:
                offset = int(name, 16)
            except ValueError:
                continue
            if len(name) != 16 or offset % self._chunk or offset >= self.size:
                continue
            idx = offset >> self._shift
            if idx not in self._chunks:
                self._chunks[idx] = self._map(idx, create=False)

    def _map(self, idx: int, create: bool) -> mmap.mmap:
        fd = os.open(self._path(idx), os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            length = self._chunk_len(idx)
            if os.fstat(fd).st_size != length:  # new, or cut short by a crash while it was made
                os.ftruncate(fd, length)
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def thaw(self) -> None:
        """Start storing: map the existing files; writes and discards take effect from now on."""
        if self.frozen:
            self.frozen = False
            self._map_existing()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.frozen:
            self._check(offset, len(data))
            return
        super().write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        if self.frozen:
            self._check(offset, length)
            return
        super().discard(offset, length)

    def _new_chunk(self, idx: int) -> mmap.mmap:
        return self._map(idx, create=True)

    def _drop_chunk(self, idx: int, chunk: mmap.mmap) -> None:
        super()._drop_chunk(idx, chunk)
        os.unlink(self._path(idx))

    def _free_pages(self, chunk: mmap.mmap, start: int, length: int) -> None:
        try:
            chunk.madvise(mmap.MADV_REMOVE, start, length)
        except OSError as e:  # a file system that cannot punch holes: zeros, without giving space back
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            chunk[start:start + length] = bytes(length)

    def close(self) -> None:
        for chunk in self._chunks.values():
            _close(chunk)
        self._chunks.clear()


class Stores:
    """Where a machine's memory lives: anonymous private memory, nothing kept."""

    def open(self, name: str, size: int) -> SparseMemory:
        """The store `name` (`ram`, or a virtio-mem device's Linux name) of `size` bytes."""
        return SparseMemory(size)


class FileStores(Stores):
    """Stores in files under `directory`, one subdirectory per store (see FileMemory)."""

    def __init__(self, directory: str, frozen: bool = False) -> None:
        self.directory = directory
        self.frozen = frozen
        self.opened: dict[str, FileMemory] = {}

    def open(self, name: str, size: int) -> SparseMemory:
        if not name or name in (".", "..") or "/" in name or name in self.opened:
            raise ValueError(f"store name {name!r} is not a file name, or not unique")
        store = self.opened[name] = FileMemory(size, os.path.join(self.directory, name), self.frozen)
        return store

    def thaw(self) -> None:
        """Every store opened frozen starts storing (FileMemory.thaw)."""
        self.frozen = False
        for store in self.opened.values():
            store.thaw()
