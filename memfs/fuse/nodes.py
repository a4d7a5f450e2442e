"""The files of the mount, each a node with its own operations (as mem.c gives each device its
own file_operations): opening a node gives a handle whose read/write serve that file.

Nothing here decides what the kernel would allow; the handles ask the model
and translate its answers (AccessError, ControlError, HotplugError) to errnos.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3

from ..audit import Opener
from ..control import Control, ControlError
from ..kernel.mem import AccessError, Buffer, Refusal
from ..machine import Machine

log = logging.getLogger("memfs.fuse")

DIR = stat.S_IFDIR
REG = stat.S_IFREG
LNK = stat.S_IFLNK
SYSFS_SIZE = 4096  # sysfs reports a page; procfs reports 0


class Handle:
    """An open file. `direct_io` decides whether reads and writes bypass the page cache."""

    direct_io = True

    async def read(self, off: int, size: int) -> Buffer:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def write(self, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EBADF)

    def release(self) -> None:
        """Called once when the last reference to the open file goes."""


class Node:
    """A file or directory; `size` is what stat shows."""

    mode: int = REG | 0o444
    size: int = 0
    cache_attrs = False  # whether the kernel may keep attributes and the entry (never changes)

    def open(self, opener: Opener, flags: int) -> Handle:
        raise pyfuse3.FUSEError(errno.EISDIR)


Listing = Callable[[int], Iterator[tuple[int, str, Node]]]


class Dir(Node):
    """A directory. `listing(after)` yields (token, name, node) for the entries whose token is
    greater than `after`, in token order (readdir resumes from a token, so a listing costs what it
    shows, not what came before); `find(name)` looks one name up."""

    def __init__(self, listing: Listing, find: Callable[[str], Node | None], mode: int = 0o555) -> None:
        self.mode = DIR | mode
        self.listing = listing
        self.find = find


class Symlink(Node):
    """A sysfs link (sysfs_create_link()): `target` is relative to the link's directory, as
    kernfs_get_target_path() writes it; stat shows its length as the size."""

    mode = LNK | 0o777

    def __init__(self, target: str) -> None:
        self.target = target
        self.size = len(os.fsencode(target))


N = TypeVar("N", bound=Node)


class FixedDir(Dir):
    """A directory whose entries never change."""

    def __init__(self, children: dict[str, Node], mode: int = 0o555) -> None:
        entries = [(token, name, node) for token, (name, node) in enumerate(children.items(), 1)]
        super().__init__(lambda after: iter(entries[after:]), children.get, mode)
        self.children = children


def fixed_dir(children: dict[str, Node], mode: int = 0o555) -> Dir:
    return FixedDir(children, mode)


def permanent(node: N) -> N:
    """Let the kernel keep the entry and attributes of `node` and, through fixed directories, of
    everything below it: nodes whose attributes never change and that never go away, or whose
    going away the adapter tells the kernel. Without it every path component costs a LOOKUP
    and a GETATTR per walk (about 100 us each)."""
    node.cache_attrs = True
    if isinstance(node, FixedDir):
        for child in node.children.values():
            permanent(child)
    return node


class _Snapshot(Handle):
    """Content rendered at open, as a seq_file reader sees one consistent snapshot."""

    def __init__(self, content: str | bytes) -> None:
        self.data = content.encode() if isinstance(content, str) else content

    async def read(self, off: int, size: int) -> Buffer:
        return self.data[off:off + size]


class TextFile(Node):
    """A read-only file rendered for each opener (text, or bytes for binary sysfs attributes)."""

    def __init__(self, render: Callable[[Opener], str | bytes], mode: int = 0o444, size: int = 0) -> None:
        self.mode = REG | mode
        self.size = size
        self.render = render

    def open(self, opener: Opener, flags: int) -> Handle:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        return _Snapshot(self.render(opener))


class _ControlHandle(Handle):
    def __init__(self, control: Control) -> None:
        self.control = control
        self.result = control.banner()

    async def read(self, off: int, size: int) -> Buffer:
        return self.result.encode()[off:off + size]

    async def write(self, off: int, buf: bytes) -> int:
        try:
            self.result = self.control.execute(buf)
        except ControlError as e:
            self.result = e.result()
            raise pyfuse3.FUSEError(e.errno) from None
        return len(buf)


class ControlFile(Node):
    """MOUNT/control: one command per write; reading shows this opener's last result."""

    mode = REG | 0o600

    def __init__(self, control: Control) -> None:
        self.control = control

    def open(self, opener: Opener, flags: int) -> Handle:
        return _ControlHandle(self.control)


class _AttrHandle(_Snapshot):
    def __init__(self, attr: SysfsAttr, text: str) -> None:
        super().__init__(text)
        self.attr = attr

    async def write(self, off: int, buf: bytes) -> int:
        if self.attr.store is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        try:
            self.attr.store(buf.decode(errors="replace"))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EINVAL) from None
        return len(buf)


@dataclass
class SysfsAttr(Node):
    """A sysfs attribute: show() at open, store() per write (DEVICE_ATTR_RO / _RW)."""

    show: Callable[[], str]
    store: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.mode = REG | (0o644 if self.store else 0o444)
        self.size = SYSFS_SIZE

    def open(self, opener: Opener, flags: int) -> Handle:
        if flags & os.O_ACCMODE != os.O_RDONLY and self.store is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        return _AttrHandle(self, self.show())


REFAULTS = 8          # refusals of one page within REFAULT_WINDOW: the kernel is retrying a fault
REFAULT_WINDOW = 1.0  # seconds


class RefaultGuard:
    """Ends a process whose kernel keeps re-asking for a refused mapped page.

    The kernel refuses such a mapping at mmap() time (EPERM); FUSE cannot, so the
    refusal comes at the fault. A plain touch then gets SIGBUS, but mlock(),
    MAP_POPULATE and MAP_LOCKED fault through get_user_pages(), which retries
    without end while the task sits in state D. After REFAULTS refusals of one page
    in REFAULT_WINDOW seconds the opener gets SIGBUS, as the touch would have,
    and SIGKILL if the retries go on; each is logged once.
    """

    def __init__(self, opener: Opener) -> None:
        self.opener = opener
        self._page = -1
        self._times: list[float] = []
        self._sent = 0

    def refused(self, page: int) -> None:
        now = time.monotonic()
        if page != self._page:
            self._page, self._times = page, []
        self._times = [t for t in self._times if now - t < REFAULT_WINDOW] + [now]
        if len(self._times) < REFAULTS:
            return
        self._times = []
        sig = signal.SIGBUS if not self._sent else signal.SIGKILL
        self._sent += 1
        log.warning("pid %d (%s) keeps faulting on refused page %#x (mlock/MAP_POPULATE): sending %s",
                    self.opener.pid, self.opener.comm, page, sig.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.opener.pid, sig)


@dataclass
class DevMemHandle(Handle):
    """An open of dev/mem: plain opens follow read_mem()/write_mem(); page-cache opens
    (mappable) follow mmap_mem()'s checks for every page they fault in or write back."""

    machine: Machine
    opener: Opener
    mapped: bool
    writable: bool
    coherent: Callable[[DevMemHandle], Awaitable[None]]
    released: Callable[[DevMemHandle], None]
    wrote_back: Callable[[int, int], None]

    def __post_init__(self) -> None:
        self.direct_io = not self.mapped
        self.refaults = RefaultGuard(self.opener)

    def _refused(self, op: str, e: AccessError | Refusal) -> pyfuse3.FUSEError:
        err = e.errno or errno.EIO
        self.machine.audit.refuse(self.opener, op, e.start, e.end, errno.errorcode[err], e.rule)
        return pyfuse3.FUSEError(err)

    def read_now(self, off: int, size: int) -> Buffer:
        """A read with nothing to wait for: what read() does once coherent() has run (or when it
        has nothing to do: a page-cache open, or no page-cache open anywhere)."""
        devmem = self.machine.devmem
        if not self.mapped:
            result = devmem.try_read_mem(off, size)
            if isinstance(result, Refusal):
                raise self._refused("read", result)
            return result
        try:
            return devmem.load_mapped(off, size)
        except AccessError as e:
            self.refaults.refused(off)
            raise self._refused("map-read", e) from None

    async def read(self, off: int, size: int) -> Buffer:
        await self.coherent(self)
        return self.read_now(off, size)

    async def write(self, off: int, buf: bytes) -> int:
        await self.coherent(self)
        devmem = self.machine.devmem
        try:
            if not self.mapped:
                return devmem.write_mem(off, buf)
            devmem.store_mapped(off, buf)
        except AccessError as e:
            raise self._refused("map-write" if self.mapped else "write", e) from None
        self.wrote_back(off, len(buf))
        return len(buf)

    def release(self) -> None:
        self.released(self)
