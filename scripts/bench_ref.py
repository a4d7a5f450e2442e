"""Reference for scripts/bench: the least a pyfuse3 server can do, one file served from an mmap.

Run: python scripts/bench_ref.py MOUNTPOINT SIZE_BYTES [--page-cache] [--refuse-from OFFSET]
(foreground; unmount or SIGTERM/SIGINT to stop). The file is `mem`; by default every open gets
FUSE direct_io (as memfs's plain opens of dev/mem), with --page-cache it goes through the page
cache (as memfs's O_SYNC opens, which MAP_SHARED needs). Same options as memfs's mount
(default_permissions) and, like memfs, the page cache is dropped on every open (keep_cache off).
With --refuse-from, reads at or above OFFSET fail with EPERM: what pyfuse3 charges for an error
reply, next to which memfs's refusals are measured.
"""
from __future__ import annotations

import argparse
import errno
import mmap
import signal
import stat

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1


class Ref(pyfuse3.Operations):
    def __init__(self, size: int, page_cache: bool, refuse_from: int) -> None:
        super().__init__()
        self.data = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.page_cache = page_cache
        self.refuse_from = refuse_from

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o600)
        a.st_nlink = 2 if ino == pyfuse3.ROOT_INODE else 1
        a.st_size = 0 if ino == pyfuse3.ROOT_INODE else len(self.data)
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)  # the size never changes (O_TRUNC is a no-op)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"mem":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"mem", self._attr(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        info = pyfuse3.FileInfo(fh=inode)
        info.direct_io = not self.page_cache
        info.keep_cache = False
        return info

    async def read(self, fh, off, size):
        if off >= self.refuse_from:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self.data[off:off + size]

    async def write(self, fh, off, buf):
        if off >= len(self.data):
            raise pyfuse3.FUSEError(errno.ENOSPC)
        n = min(len(buf), len(self.data) - off)
        self.data[off:off + n] = buf[:n]
        return n


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mountpoint")
    p.add_argument("size", type=lambda s: int(s, 0))
    p.add_argument("--page-cache", action="store_true", help="serve through the page cache (no direct_io)")
    p.add_argument("--refuse-from", type=lambda s: int(s, 0), default=1 << 63,
                   help="reads at or above this offset fail with EPERM")
    args = p.parse_args()
    mode = "pagecache" if args.page_cache else "directio"
    options = set(pyfuse3.default_options) | {"fsname=memfs-bench-pyfuse3", f"subtype={mode}"}
    pyfuse3.init(Ref(args.size, args.page_cache, args.refuse_from), args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
