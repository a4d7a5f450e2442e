"""Dropped writes through a mapping: keep cached pages reading as the bus reads them.

Firmware, ROM and the floating bus drop what is stored, but a store through a
MAP_SHARED mapping of dev/mem lands in a page-cache page and no FUSE request
tells the daemon about it: the writer (and every other mapper) reads its own
value back until the page is written back, if ever. The Restorer puts what the
bus reads back into such pages (FUSE_NOTIFY_STORE): once after every write-back
of them, and round after round for as long as a writable page-cache open exists
(a store cannot be seen, only undone soon). A store thus reads back for about
10 us, where hardware gives 0xff at once: memtester on an empty PCI window
reports failures wherever a round lands between a store and its check (most
runs; a run whose checks all fall between rounds passes). A store costs the
writer nothing.

It runs in a thread of its own: notify_store waits for the page lock, which a
write fault holds while it waits for the daemon to answer a write-back.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import pyfuse3

log = logging.getLogger("memfs.fuse")

# Rounds follow each other without a pause (about 10 us each; a sleep alone costs 35 us in
# Python) for SPIN_SECONDS after the last fault or write-back of a watched range, then come
# every IDLE_INTERVAL: a mapping left open for hours costs a core for seconds only.
SPIN_SECONDS = 5.0
IDLE_INTERVAL = 1e-3
MAX_WATCHED = 256            # ranges kept (least recently faulted go first): bounds a round's cost
_GONE = (errno.EBADF, errno.ENODEV, errno.ENOTCONN, errno.ECONNABORTED)  # the session ended


class Restorer:
    """The ranges of dev/mem (start -> bus bytes) to put back into the page cache.

    `watch` and `forget` are called from the serving thread and never block on
    the restoring thread's syscalls; `quiesce` waits for a round in progress.
    """

    def __init__(self, inode: Callable[[], int | None]) -> None:
        self._inode = inode
        self._cond = threading.Condition()
        self._ranges: OrderedDict[int, tuple[bytes, bool]] = OrderedDict()   # start -> (data, stored once)
        self._writers = 0
        self._busy = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._logged: set[int | None] = set()
        self._last_watch = 0.0

    def watch(self, ranges: list[tuple[int, bytes]]) -> None:
        """Restore these (start, bus bytes) ranges: at least once, then while writers exist."""
        if not ranges:
            return
        with self._cond:
            self._last_watch = time.monotonic()
            for start, data in ranges:
                self._ranges[start] = (data, False)
                self._ranges.move_to_end(start)
            while len(self._ranges) > MAX_WATCHED:
                self._ranges.popitem(last=False)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="memfs-restore", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def writers(self, delta: int) -> None:
        """A writable page-cache open came (+1) or went (-1); with none left, ranges stored once are done."""
        with self._cond:
            self._writers += delta

    @property
    def writers_open(self) -> bool:
        return self._writers > 0

    @property
    def busy(self) -> bool:
        return self._busy

    def forget(self) -> None:
        """Memory changed: what was watched may no longer be what the bus reads there."""
        with self._cond:
            self._ranges.clear()

    def quiesce(self) -> None:
        """Wait until no round is in progress (after `forget`: none will store stale bytes). Blocks."""
        with self._cond:
            while self._busy:
                self._cond.wait()

    def stop(self) -> None:
        """End the thread (the session is closing); waits a second at most."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _round(self) -> list[tuple[int, bytes]] | None:
        """The next round's ranges, waiting while there are none; None once stopped."""
        with self._cond:
            if not self._writers:
                for start in [s for s, (_, stored) in self._ranges.items() if stored]:
                    del self._ranges[start]
            while not self._ranges and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            self._busy = True
            return [(start, data) for start, (data, _) in self._ranges.items()]

    def _run(self) -> None:
        while (ranges := self._round()) is not None:
            done: list[tuple[int, bytes]] = []
            failed: list[int] = []
            try:
                self._store(ranges, done, failed)
            finally:
                with self._cond:
                    self._busy = False
                    for start, data in done:
                        if self._ranges.get(start, (None,))[0] is data:
                            self._ranges[start] = (data, True)
                    for start in failed:
                        self._ranges.pop(start, None)
                    self._cond.notify_all()
            if time.monotonic() - self._last_watch > SPIN_SECONDS:
                time.sleep(IDLE_INTERVAL)

    def _store(self, ranges: list[tuple[int, bytes]], done: list[tuple[int, bytes]], failed: list[int]) -> None:
        """One round: notify_store every range; fills `done` and `failed` (dropped, logged once per errno)."""
        ino = self._inode()
        if ino is None:
            failed.extend(start for start, _ in ranges)
            return
        for start, data in ranges:
            try:
                pyfuse3.notify_store(ino, start, data)
            except OSError as e:
                if e.errno in _GONE:
                    self._stopped = True
                    return
                if e.errno not in self._logged:
                    self._logged.add(e.errno)
                    log.warning("could not restore dropped writes at %#x: %s (logged once)", start, e.strerror)
                failed.append(start)
            else:
                done.append((start, data))
