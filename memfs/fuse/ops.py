"""The FUSE adapter: pyfuse3 requests routed to the nodes of the mount, errors to errnos.

What lives here is FUSE plumbing only: inodes, open-file handles, which
FUSE mode an open gets, and revoking cached pages and live mappings of
dev/mem when the model says memory changed.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from .. import sysfs
from ..audit import Opener
from ..kernel.mem import Buffer
from ..machine import Machine
from . import layout
from .nodes import DevMemHandle, Dir, Handle, Node, Symlink
from .restore import Restorer

log = logging.getLogger("memfs.fuse")

P = ParamSpec("P")
R = TypeVar("R")
Path = tuple[str, ...]
MEM_PATH: Path = ("dev", "mem")
MEMORY_DIR: Path = ("sys", "devices", "system", "memory")


def _guard(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """A handler bug becomes EIO in the caller and a log line, never a dead daemon."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class MemfsOps(pyfuse3.Operations):
    """pyfuse3 operations over the nodes of `layout.build(machine)`."""

    def __init__(self, machine: Machine) -> None:
        super().__init__()
        self.machine = machine
        self.root = layout.build(machine, layout.DevMemFile(machine, self._devmem_handle))
        self._ino: dict[Path, int] = {(): pyfuse3.ROOT_INODE}
        self._path: dict[int, Path] = {pyfuse3.ROOT_INODE: ()}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._revoke_pending = False
        self._changed: list[tuple[int, int]] = []   # memory ranges added or removed since the last revocation
        self._page_cache_opens = 0
        self.restorer = Restorer(lambda: self._ino.get(MEM_PATH))
        machine.changed.connect(self._memory_changed)
        # Build the address maps now, before serving, rather than in the first read (seconds on a
        # machine of 100,000 resources); later changes to the tree redo only what they touch.
        machine.devmem.prepare()
        machine.bus.prepare()

    # -- the namespace ------------------------------------------------------

    def _node(self, path: Path) -> Node:
        node: Node = self.root
        for name in path:
            child = node.find(name) if isinstance(node, Dir) else None
            if child is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = child
        return node

    def _inode(self, path: Path) -> pyfuse3.InodeT:
        ino = self._ino.get(path)
        if ino is None:
            ino = self._ino[path] = len(self._ino) + pyfuse3.ROOT_INODE
            self._path[ino] = path
        return pyfuse3.InodeT(ino)

    def _lookup_path(self, inode: int) -> Path:
        try:
            return self._path[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, path: Path, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode(path)
        a.st_mode = pyfuse3.ModeT(node.mode)
        a.st_nlink = 2 if stat.S_ISDIR(node.mode) else 1
        a.st_size = node.size
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        # Only nodes that never change are cached; memoryN come and go and are asked afresh.
        a.attr_timeout = a.entry_timeout = 3600 if node.cache_attrs else 0
        return a

    # -- metadata -------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = self._lookup_path(parent_inode) + (os.fsdecode(name),)
        return self._attr(path, self._node(path))

    @_guard
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._lookup_path(inode)
        return self._attr(path, self._node(path))

    @_guard
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        node = self._node(self._lookup_path(inode))
        if not isinstance(node, Symlink):
            raise pyfuse3.FUSEError(errno.EINVAL)  # readlink(2) of a non-link
        return pyfuse3.FileNameT(os.fsencode(node.target))

    @_guard
    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: pyfuse3.FileHandleT | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # O_TRUNC on dev/mem or a command file changes nothing, as on a device or procfs.
        path = self._lookup_path(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(path, self._node(path))

    @_guard
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not isinstance(self._node(self._lookup_path(inode)), Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @_guard
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path[fh]
        node = self._node(path)
        assert isinstance(node, Dir)
        for next_id, name, child in node.listing(start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(path + (name,), child), next_id):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # -- files ----------------------------------------------------------------

    @_guard
    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle = self._node(self._lookup_path(inode)).open(Opener.from_pid(ctx.pid, ctx.uid), flags)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        info = pyfuse3.FileInfo()
        info.fh = pyfuse3.FileHandleT(fh)
        info.keep_cache = False
        info.direct_io = handle.direct_io
        return info

    # pyfuse3 replies with any buffer (PyObject_GetBuffer), before anything else runs: a view of
    # memory goes out without a copy.
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> Buffer:  # type: ignore[override]
        # _guard inlined: this is the path of every dev/mem read(2) and fault
        try:
            handle = self._handles[fh]
            if type(handle) is DevMemHandle and (handle.mapped or not self._page_cache_opens):
                data = handle.read_now(off, size)  # nothing to make coherent first: no await
                if handle.mapped and self.restorer.writers_open:
                    self._watch(off, len(data))
                return data
            return await handle.read(off, size)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("read failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_guard
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if isinstance(handle, DevMemHandle):
            return await handle.write(off, buf)
        # A command may take memory away: what a process stored through a mapping
        # must land before that, not be refused after.
        await self._invalidate()
        try:
            return await handle.write(off, buf)
        finally:
            if self._revoke_pending:
                self._revoke_pending = False
                await self._invalidate()
                await self._forget_removed_blocks()

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.release()

    # -- dev/mem and revocation -------------------------------------------------

    def _devmem_handle(self, opener: Opener, mapped: bool, writable: bool) -> DevMemHandle:
        self._page_cache_opens += mapped
        if mapped and writable:
            self.restorer.writers(+1)
        return DevMemHandle(self.machine, opener, mapped, writable, self._coherent, self._devmem_released,
                            self._watch)

    def _devmem_released(self, handle: DevMemHandle) -> None:
        self._page_cache_opens -= handle.mapped
        if handle.mapped and handle.writable:
            self.restorer.writers(-1)

    async def _coherent(self, handle: DevMemHandle) -> None:
        """Make a plain read/write see (and be seen by) live mappings, as /dev/mem's do.

        Stores through a MAP_SHARED mapping sit in dirty page-cache pages; a
        direct read would miss them and a direct write would be hidden behind
        cached pages. While any page-cache open exists, write them back and drop
        them first.
        """
        if not handle.mapped and self._page_cache_opens:
            await self._invalidate()

    def _watch(self, start: int, size: int) -> None:
        """Pages of [start, start+size) are in the page cache (faulted in or written back): where the
        bus drops writes, have the restorer put back what the bus reads (restore.py)."""
        bus = self.machine.bus
        self.restorer.watch([(s, bytes(bus.load(s, n))) for s, n in bus.dropping_runs(start, size)])

    def _memory_changed(self, start: int, size: int) -> None:
        self._revoke_pending = True
        self._changed.append((start, size))
        self.restorer.forget()

    async def _forget_removed_blocks(self) -> None:
        """Invalidate the memoryN entries the kernel may keep (layout) of blocks that went away,
        before the write that removed them returns. Costs the changed blocks the kernel has seen."""
        changed, self._changed = self._changed, []
        hp = self.machine.hotplug
        parent = self._ino.get(MEMORY_DIR)
        gone = [name for start, size in changed
                for mb_id in range(start // hp.block_size, (start + size - 1) // hp.block_size + 1)
                if MEMORY_DIR + (name := f"{sysfs.MEMORY_PREFIX}{mb_id}",) in self._ino and mb_id not in hp.blocks]
        if parent is not None and gone:
            await trio.to_thread.run_sync(_invalidate_entries, parent, gone, abandon_on_cancel=True)

    async def _invalidate(self) -> None:
        """Drop every cached page and live mapping of dev/mem (revocation).

        Invalidation may need the daemon to serve requests (write-back of
        dirty mapped pages), so it runs in a worker thread while this task
        waits and the others go on serving.
        """
        if self.restorer.busy:   # a round begun before the change must not store into new pages
            await trio.to_thread.run_sync(self.restorer.quiesce, abandon_on_cancel=True)
        ino = self._ino.get(MEM_PATH)
        if ino is None:
            return
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False, abandon_on_cancel=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode, nothing cached
                raise


def _invalidate_entries(parent: int, names: list[str]) -> None:
    """notify_inval_entry for each name; one the kernel does not hold (ENOENT) needs nothing."""
    for name in names:
        try:
            pyfuse3.invalidate_entry(pyfuse3.InodeT(parent), os.fsencode(name))
        except FileNotFoundError:
            pass
