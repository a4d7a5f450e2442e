"""Reference for scripts/bench: the least a pyfuse3 server can do, one direct_io file served from an mmap.

Run: python scripts/bench_ref.py MOUNTPOINT SIZE_BYTES (foreground; unmount to stop).
"""
from __future__ import annotations

import errno
import mmap
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1


class Ref(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o600)
        a.st_size = 0 if ino == pyfuse3.ROOT_INODE else len(self.data)
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"mem":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def open(self, inode, flags, ctx):
        info = pyfuse3.FileInfo(fh=inode)
        info.direct_io = True
        return info

    async def read(self, fh, off, size):
        return self.data[off:off + size]

    async def write(self, fh, off, buf):
        self.data[off:off + len(buf)] = buf
        return len(buf)


def main() -> None:
    pyfuse3.init(Ref(int(sys.argv[2])), sys.argv[1], {"fsname=memfs-bench-ref"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
