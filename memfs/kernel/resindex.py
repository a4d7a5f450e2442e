"""Address lookups over a resource's children, for any sibling list a dump can hold; range unions.

The kernel walks sibling lists linearly; parsed dumps can hold hundreds of
thousands of resources, overlapping or out of order, so lookups go through
this index instead. It is rebuilt lazily after a list changes (the tree sets
`Resource._ix` to None).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import TypeVar

from .ioport import Resource


class ChildIndex:
    """Children sorted by start, with prefix maxima of their ends.

    Scanning left from the last child starting at or before `end` may stop
    as soon as the running maximum falls below `start`: no earlier child can
    reach the query. For the kernel's own (non-overlapping) lists this visits
    exactly the overlapping children.
    """

    __slots__ = ("order", "starts", "maxend")

    def __init__(self, children: list[Resource]) -> None:
        self.order = sorted(children, key=lambda r: r.start)
        self.starts = [r.start for r in self.order]
        self.maxend = []
        top = -1
        for r in self.order:
            top = max(top, r.end)
            self.maxend.append(top)

    def overlapping(self, start: int, end: int) -> list[Resource]:
        i = bisect.bisect_right(self.starts, end) - 1
        hits = []
        while i >= 0 and self.maxend[i] >= start:
            if self.order[i].end >= start:
                hits.append(self.order[i])
            i -= 1
        hits.reverse()
        return hits


def index(node: Resource) -> ChildIndex:
    if node._ix is None:
        node._ix = ChildIndex(node.children)
    return node._ix  # type: ignore[return-value]


def union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of inclusive ranges as disjoint ranges, ascending; touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


V = TypeVar("V")


def splice_runs(starts: list[int], values: list[V], dirty: list[tuple[int, int]],
                fresh: Callable[[int, int], Iterable[tuple[int, V]]], top: int) -> tuple[list[int], list[V]]:
    """Runs (`starts[i]` up to the next start: `values[i]`, equal neighbours merged) over [0, top)
    with the disjoint, ascending, non-touching ranges `dirty` redone by `fresh(lo, hi)`, which gives
    (start, value) points from `lo` on, ascending, covering [lo, hi]. Everything outside `dirty` is
    kept, so the result is what a full rebuild gives whenever `fresh` is exact on its range."""
    out_s: list[int] = []
    out_v: list[V] = []

    def push(start: int, value: V) -> None:
        if not out_v or out_v[-1] != value:
            out_s.append(start)
            out_v.append(value)

    i = 0  # the first old run not yet copied or passed over
    for lo, hi in dirty:
        j = bisect.bisect_left(starts, lo, i)
        if j > i:  # old runs before the range: only the first can merge with what precedes it
            push(starts[i], values[i])
            out_s.extend(starts[i + 1:j])
            out_v.extend(values[i + 1:j])
        for start, value in fresh(lo, hi):
            push(start, value)
        if hi + 1 >= top:
            i = len(starts)
            break
        k = bisect.bisect_right(starts, hi + 1) - 1  # the old run holding hi + 1 (clean)
        push(hi + 1, values[k])
        i = k + 1
    if i < len(starts):
        push(starts[i], values[i])
        out_s.extend(starts[i + 1:])
        out_v.extend(values[i + 1:])
    return out_s, out_v
