"""The FUSE adapter: files of the mount mapped onto the model, errors onto errnos.

Nothing here decides what the kernel would allow; it asks the machine. What
lives here is FUSE plumbing: inodes, per-open snapshots, which FUSE mode an
open of dev/mem gets, and revoking cached pages and mappings after a change.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from ..audit import Opener
from ..control import Control, ControlError
from ..kernel.iomem import render
from ..machine import AccessError, Machine
from .creds import CAP_SYS_ADMIN, CAP_SYS_RAWIO, has_capability

log = logging.getLogger("memfs.fuse")

DIR = stat.S_IFDIR
REG = stat.S_IFREG
SYSFS_SIZE = 4096  # sysfs reports a page; procfs reports 0
MEM_PATH = ("dev", "mem")


@dataclass
class Node:
    """A file or directory of the mount.

    `render(opener)` gives a text file's content, snapshotted at open as seq_file
    readers get it; `write(opener, text)` takes one command per write(2) and
    raises ControlError to fail it.
    """

    mode: int
    size: int = 0
    render: Callable[[Opener], str] | None = None
    write: Callable[[Opener, str], object] | None = None


@dataclass
class OpenFile:
    path: tuple[str, ...]
    node: Node
    opener: Opener
    mapped: bool = False
    snapshot: bytes = b""
    stale: bool = False  # a write happened: the next read from offset 0 renders afresh


def _guard(handler):
    """A handler bug becomes EIO in the caller and a log line, never a dead daemon."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class MemfsOps(pyfuse3.Operations):
    def __init__(self, machine: Machine) -> None:
        super().__init__()
        self.machine = machine
        self.control = Control(machine)
        self._ino: dict[tuple[str, ...], int] = {(): pyfuse3.ROOT_INODE}
        self._path: dict[int, tuple[str, ...]] = {pyfuse3.ROOT_INODE: ()}
        self._files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._revoke_pending = False
        self._page_cache_opens = 0
        machine.on_change.append(self._content_changed)

    # -- the namespace -------------------------------------------------------

    def _entries(self, path: tuple[str, ...]) -> dict[str, Node] | None:
        """Children of a directory, or None if `path` is not a directory."""
        m = self.machine
        if path == ():
            return {"dev": Node(DIR | 0o755), "proc": Node(DIR | 0o555), "sys": Node(DIR | 0o555),
                    "control": Node(REG | 0o600, 0, self.control.last_result, self.control.execute),
                    "memory-devices": Node(REG | 0o444, 0, lambda _: self.control.memory_devices()),
                    "audit": Node(REG | 0o400, 0, lambda _: self.control.audit())}
        if path == ("dev",):
            return {"mem": Node(REG | 0o600, m.size)}
        if path == ("proc",):
            return {"iomem": Node(REG | 0o444, 0, self._iomem)}
        if path == ("sys",):
            return {"devices": Node(DIR | 0o555)}
        if path == ("sys", "devices"):
            return {"system": Node(DIR | 0o555)}
        if path == ("sys", "devices", "system"):
            return {"memory": Node(DIR | 0o555)}
        if path[:4] == ("sys", "devices", "system", "memory"):
            return self._sysfs(path[4:])
        return None

    def _sysfs(self, rest: tuple[str, ...]) -> dict[str, Node] | None:
        files = self.control.sysfs_files(rest)
        if files is None:
            return None
        return {name: (Node(DIR | 0o755) if spec is None else
                       Node(REG | (0o644 if spec[1] else 0o444), SYSFS_SIZE, spec[0], spec[1]))
                for name, spec in files.items()}

    def _iomem(self, opener: Opener) -> str:
        return render(self.machine.tree, has_capability(opener.pid, opener.uid, CAP_SYS_ADMIN))

    def _node(self, path: tuple[str, ...]) -> Node:
        if path == ():
            return Node(DIR | 0o755)
        siblings = self._entries(path[:-1])
        if siblings is None or path[-1] not in siblings:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return siblings[path[-1]]

    def _inode(self, path: tuple[str, ...]) -> int:
        ino = self._ino.get(path)
        if ino is None:
            ino = self._ino[path] = len(self._ino) + pyfuse3.ROOT_INODE
            self._path[ino] = path
        return ino

    def _lookup_path(self, inode: int) -> tuple[str, ...]:
        try:
            return self._path[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, path: tuple[str, ...], node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode(path)
        a.st_mode = node.mode
        a.st_nlink = 2 if stat.S_ISDIR(node.mode) else 1
        a.st_size = node.size
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        # dev/mem never changes shape; everything else (memoryN come and go) is asked afresh.
        a.attr_timeout = a.entry_timeout = 3600 if path == MEM_PATH else 0
        return a

    # -- metadata --------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        path = self._lookup_path(parent_inode) + (os.fsdecode(name),)
        if name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(path, self._node(path))

    @_guard
    async def getattr(self, inode, ctx=None):
        path = self._lookup_path(inode)
        return self._attr(path, self._node(path))

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        # O_TRUNC on dev/mem or a command file changes nothing, as on a device or procfs.
        path = self._lookup_path(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(path, self._node(path))

    @_guard
    async def opendir(self, inode, ctx):
        path = self._lookup_path(inode)
        if self._entries(path) is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh, start_id, token):
        path = self._path[fh]
        entries = sorted((self._entries(path) or {}).items())
        for i, (name, node) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(path + (name,), node), i):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # -- files -----------------------------------------------------------------

    @_guard
    async def open(self, inode, flags, ctx):
        path = self._lookup_path(inode)
        node = self._node(path)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        opener = Opener.from_pid(ctx.pid, ctx.uid)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and node.write is None and path != MEM_PATH:
            raise pyfuse3.FUSEError(errno.EACCES)
        info = pyfuse3.FileInfo()
        info.keep_cache = False
        info.direct_io = True
        mapped = False
        if path == MEM_PATH:
            if not has_capability(ctx.pid, ctx.uid, CAP_SYS_RAWIO):
                raise pyfuse3.FUSEError(errno.EPERM)  # open_mem(): capable(CAP_SYS_RAWIO)
            # MAP_SHARED needs the page cache (design.md); O_SYNC opens are the mmap tools'.
            mapped = bool(flags & os.O_DSYNC)
            info.direct_io = not mapped
            self._page_cache_opens += mapped
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = f = OpenFile(path, node, opener, mapped)
        if node.render is not None:
            f.snapshot = node.render(opener).encode()
        info.fh = fh
        return info

    @_guard
    async def read(self, fh, off, size):
        f = self._files[fh]
        if f.path == MEM_PATH:
            await self._coherent(f)
            try:
                return self.machine.read_mem(off, size, f.opener, f.mapped)
            except AccessError as e:
                raise pyfuse3.FUSEError(e.errno) from None
        if f.stale and off == 0:
            f.snapshot = f.node.render(f.opener).encode()
            f.stale = False
        return f.snapshot[off:off + size]

    @_guard
    async def write(self, fh, off, buf):
        f = self._files[fh]
        if f.path == MEM_PATH:
            await self._coherent(f)
            try:
                written = self.machine.write_mem(off, bytes(buf), f.opener, f.mapped)
            except AccessError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            return written
        try:
            text = buf.decode()
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        # Write back dirty mapped pages first: what a process stored before an
        # unplug must land before the memory is discarded, not be refused after.
        await self._invalidate()
        try:
            f.node.write(f.opener, text)
        except ControlError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        finally:
            f.stale = True
            if self._revoke_pending:
                self._revoke_pending = False
                await self._invalidate()
        return len(buf)

    async def release(self, fh):
        f = self._files.pop(fh, None)
        if f is not None and f.mapped:
            self._page_cache_opens -= 1

    async def _coherent(self, f: OpenFile) -> None:
        """Make a plain read/write see (and be seen by) live mappings, as /dev/mem's do.

        Stores through a MAP_SHARED mapping sit in dirty page-cache pages; a
        direct read would miss them and a direct write would be hidden behind
        cached pages. While any page-cache open exists, write them back and drop
        them first.
        """
        if not f.mapped and self._page_cache_opens:
            await self._invalidate()

    # -- revocation --------------------------------------------------------------

    def _content_changed(self, start: int, size: int) -> None:
        self._revoke_pending = True

    async def _invalidate(self) -> None:
        """Drop every cached page and live mapping of dev/mem (revocation).

        Invalidation may need the daemon to serve requests (write-back of
        dirty mapped pages), so it runs in a worker thread while this task
        waits and the others go on serving.
        """
        ino = self._ino.get(MEM_PATH)
        if ino is None:
            return
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode, nothing cached
                raise
