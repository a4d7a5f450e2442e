"""Bounded record of refused /dev/mem accesses, and a rate-limited log of them.

The log follows printk_ratelimit(): per (rule, process) at most `burst`
lines per `interval` seconds, then one line saying how many were
suppressed. The record (MOUNT/audit) keeps the most recent `limit`
refusals whatever the log says.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger("memfs.audit")

RATELIMIT_INTERVAL = 5.0   # DEFAULT_RATELIMIT_INTERVAL (5 * HZ)
RATELIMIT_BURST = 10       # DEFAULT_RATELIMIT_BURST


@dataclass(frozen=True)
class Opener:
    """Who opened the file an access comes through (from the FUSE request context at open)."""

    pid: int
    comm: str
    uid: int

    @classmethod
    def from_pid(cls, pid: int, uid: int) -> Opener:
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        return cls(pid, comm, uid)


KERNEL = Opener(0, "memfs", 0)


class Record(NamedTuple):
    """One refusal; a plain tuple until someone reads it (line() formats it then)."""

    when: float
    opener: Opener
    op: str
    start: int
    end: int
    errno_name: str
    rule: str

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.when))
        return (f"{stamp} pid={self.opener.pid} comm={self.opener.comm} uid={self.opener.uid} "
                f"{self.op} [{self.start:#x}-{self.end:#x}] {self.errno_name}: {self.rule}\n")


class RateLimit:
    """___ratelimit(): `burst` events per `interval` per key; counts what it suppresses."""

    def __init__(self, interval: float = RATELIMIT_INTERVAL, burst: int = RATELIMIT_BURST,
                 keys: int = 4096) -> None:
        self.interval = interval
        self.burst = burst
        self._keys = keys
        self._state: collections.OrderedDict[object, list[float | int]] = collections.OrderedDict()

    def __call__(self, key: object, now: float) -> tuple[bool, int]:
        """(whether to print, how many were suppressed in the interval that just ended)."""
        state = self._state.get(key)
        suppressed = 0
        if state is None or now - state[0] >= self.interval:
            suppressed = int(state[2]) if state is not None else 0
            state = [now, 0, 0]
            self._state[key] = state
            if len(self._state) > self._keys:  # bounded: forget the oldest key
                self._state.popitem(last=False)
        if state[1] < self.burst:
            state[1] += 1
            return True, suppressed
        state[2] += 1
        return False, suppressed


class Audit:
    """The most recent `limit` records; the log gets them rate-limited per rule and process."""

    def __init__(self, limit: int = 1000) -> None:
        # Record fields as plain tuples (a tuple display costs a tenth of Record()); records() has Records.
        self._records: collections.deque[tuple[float, Opener, str, int, int, str, str]] = collections.deque(
            maxlen=limit)
        self.total = 0
        self._ratelimit = RateLimit()

    def refuse(self, opener: Opener, op: str, start: int, end: int, errno_name: str, rule: str) -> None:
        """Record one refusal; log it unless its (rule, pid) is over the rate limit.

        On the path of every refused access, so it stores the fields and no more: the
        text is made when the record is read (text()) or logged."""
        now = time.time()
        self._records.append((now, opener, op, start, end, errno_name, rule))
        self.total += 1
        limit = self._ratelimit
        state = limit._state.get((rule, opener.pid))
        if state is not None and state[1] >= limit.burst and now - state[0] < limit.interval:
            state[2] += 1  # over the limit in this interval: counted, not logged (the common case in a flood)
            return
        show, suppressed = limit((rule, opener.pid), now)
        if suppressed:
            log.warning("%d refusals suppressed: pid=%d comm=%s: %s", suppressed, opener.pid, opener.comm, rule)
        if show:
            log.warning("refused %s", Record(*self._records[-1]).line().rstrip())

    @property
    def records(self) -> list[Record]:
        """The kept records, oldest first."""
        return [Record(*r) for r in self._records]

    def text(self) -> str:
        records = self.records
        dropped = self.total - len(records)
        head = f"# {self.total} refused accesses" + (f", oldest {dropped} dropped" if dropped else "") + "\n"
        return head + "".join(r.line() for r in records)
