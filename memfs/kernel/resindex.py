"""Address lookups over a resource's children, for any sibling list a dump can hold; range unions.

The kernel walks sibling lists linearly; parsed dumps can hold hundreds of
thousands of resources, overlapping or out of order, so lookups go through
this index instead. It is rebuilt lazily after a list changes (the tree sets
`Resource._ix` to None).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable

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
