"""Bounded record of refused /dev/mem accesses (and device spec violations)."""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("memfs.audit")


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


@dataclass(frozen=True)
class Record:
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


class Audit:
    """The most recent `limit` records, also sent to the daemon log."""

    def __init__(self, limit: int = 1000) -> None:
        self.records: collections.deque[Record] = collections.deque(maxlen=limit)
        self.total = 0

    def refuse(self, opener: Opener, op: str, start: int, end: int, errno_name: str, rule: str) -> None:
        record = Record(time.time(), opener, op, start, end, errno_name, rule)
        self.records.append(record)
        self.total += 1
        log.warning("refused %s", record.line().rstrip())

    def text(self) -> str:
        dropped = self.total - len(self.records)
        head = f"# {self.total} refused accesses" + (f", oldest {dropped} dropped" if dropped else "") + "\n"
        return head + "".join(r.line() for r in self.records)
