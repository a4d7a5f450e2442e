"""`kernel/resource.c`: the iomem resource tree (spec section 2).

Every mutation mirrors the kernel function of the same name; a refused
mutation raises `ResourceConflict` and leaves the tree untouched. Address
lookups descend through per-node indexes (children sorted by start with a
running maximum of their ends), so they cost O(depth * log n) even for
parsed dumps whose siblings overlap or are out of order.
"""
from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterator

from .ioport import (
    IORES_DESC_NONE,
    IORESOURCE_BUSY,
    IORESOURCE_EXCLUSIVE,
    IORESOURCE_EXT_TYPE_BITS,
    IORESOURCE_MEM,
    IORESOURCE_SYSRAM_MERGEABLE,
    IORESOURCE_SYSTEM_RAM,
    IORESOURCE_TYPE_BITS,
    Resource,
)
from .resindex import index as _index
from .sizes import PAGE_MASK, PAGE_SIZE

MAX_IORES_LEVEL = 5

REGION_INTERSECTS = 0
REGION_DISJOINT = 1
REGION_MIXED = 2

# Called after every change with the inclusive address range [start, end] outside which no
# address overlaps a different set of resources, or a resource whose flags, desc or name changed.
ChangeListener = Callable[[int, int], None]


class ResourceConflict(Exception):
    """A request the kernel answers with -EBUSY (or -EINVAL); names both parties."""

    def __init__(self, message: str, err: int = errno.EBUSY) -> None:
        super().__init__(message)
        self.errno = err


def _type_match(r: Resource, flags: int, desc: int) -> bool:
    """is_type_match(): all requested flag bits present, desc matches unless NONE."""
    return (r.flags & flags) == flags and (desc == IORES_DESC_NONE or r.desc == desc)


class ResourceTree:
    """`iomem_resource` and the functions of kernel/resource.c that act on it."""

    def __init__(self, name: str = "PCI mem", end: int = (1 << 64) - 1) -> None:
        self.root = Resource(0, end, name, IORESOURCE_MEM)
        # Bumped on every change so derived caches (policy maps) know to rebuild.
        self.generation = 0
        self._listeners: list[ChangeListener] = []

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(start, end)` after every later change, with the address range it
        touched: derived maps (PolicyMap, ContentMap) redo that range only."""
        self._listeners.append(listener)

    # -- structure helpers -------------------------------------------------

    def _changed(self, start: int, end: int, *nodes: Resource) -> None:
        for node in nodes:
            node._ix = None
        self.generation += 1
        for listener in self._listeners:
            listener(start, end)

    @staticmethod
    def _insert_child(parent: Resource, new: Resource) -> None:
        """Link `new` into parent's list at its sorted position."""
        kids = parent.children
        pos = bisect.bisect_right(kids, new.start, key=lambda r: r.start)
        kids.insert(pos, new)
        new.parent = parent

    @staticmethod
    def _position(r: Resource) -> int:
        kids = r.parent.children  # type: ignore[union-attr]
        pos = bisect.bisect_left(kids, r.start, key=lambda c: c.start)
        for i in range(pos, len(kids)):
            if kids[i] is r:
                return i
        return kids.index(r)  # an unsorted (parsed) list

    def walk(self, root: Resource | None = None) -> Iterator[tuple[Resource, int]]:
        """for_each_resource() over the whole tree: (resource, depth) in pre-order."""
        stack = [(c, 0) for c in reversed((root or self.root).children)]
        while stack:
            r, depth = stack.pop()
            yield r, depth
            stack.extend((c, depth + 1) for c in reversed(r.children))

    def overlapping(self, start: int, end: int, root: Resource | None = None) -> Iterator[Resource]:
        """Pre-order walk restricted to resources overlapping [start, end].

        The kernel walks skip the children of resources that end before the
        range and stop at the first one starting after it; this visits the
        same nodes through the indexes.
        """
        stack = list(reversed(_index(root or self.root).overlapping(start, end)))
        while stack:
            r = stack.pop()
            yield r
            if r.children:
                stack.extend(reversed(_index(r).overlapping(start, end)))

    def lookup(self, addr: int) -> list[Resource]:
        """The chain of resources containing `addr`, outermost first."""
        chain = []
        node = self.root
        while node.children:
            hits = _index(node).overlapping(addr, addr)
            if not hits:
                break
            node = hits[-1]
            chain.append(node)
        return chain

    def set_flags(self, res: Resource, flags: int, desc: int | None = None) -> None:
        """Change a linked resource's flags (and desc) in place, as drivers do to res->flags."""
        res.flags = flags
        if desc is not None:
            res.desc = desc
        self._changed(res.start, res.end)

    # -- request / insert / release ----------------------------------------

    def _request_conflict(self, root: Resource, new: Resource) -> Resource | None:
        """__request_resource(): the conflicting resource, or None once linked."""
        if new.end < new.start or new.start < root.start or new.end > root.end:
            return root
        hits = _index(root).overlapping(new.start, new.end)
        if hits:
            return hits[0]
        self._insert_child(root, new)
        self._changed(new.start, new.end, root)
        return None

    def request_resource(self, new: Resource, root: Resource | None = None) -> Resource:
        """request_resource(): link `new` as a direct child of root, or -EBUSY."""
        root = root or self.root
        conflict = self._request_conflict(root, new)
        if conflict is not None:
            raise ResourceConflict(_conflict_text("request_resource", new, conflict, root))
        return new

    def insert_resource(self, new: Resource, parent: Resource | None = None) -> Resource:
        """insert_resource(): link `new`, adopting the resources it covers."""
        parent = parent or self.root
        if new.end < new.start:
            raise ResourceConflict(f"insert_resource: {new.label()} has end before start", errno.EINVAL)
        while True:
            if new.start < parent.start or new.end > parent.end:
                raise ResourceConflict(_conflict_text("insert_resource", new, parent, parent))
            hits = _index(parent).overlapping(new.start, new.end)
            if not hits:
                self._insert_child(parent, new)
                self._changed(new.start, new.end, parent)
                return new
            first = hits[0]
            if first is new:
                raise ResourceConflict(f"insert_resource: {new.label()} is already in the tree")
            if (first.start <= new.start and first.end >= new.end
                    and not (first.start == new.start and first.end == new.end)):
                parent = first
                continue
            break
        for sib in hits:
            if sib.start < new.start or sib.end > new.end:
                raise ResourceConflict(_conflict_text("insert_resource", new, sib, parent))
        kids = parent.children
        pos = self._position(first)
        adopted = set(map(id, hits))
        parent.children = [c for c in kids if id(c) not in adopted]
        parent.children.insert(pos, new)
        new.parent = parent
        new.children = hits
        for c in hits:
            c.parent = new
        self._changed(new.start, new.end, parent, new)
        return new

    def release_resource(self, old: Resource) -> None:
        """release_resource(): unlink `old` together with its subtree."""
        parent = old.parent
        if parent is None:
            raise ResourceConflict(f"release_resource: {old.label()} is not in the tree", errno.EINVAL)
        del parent.children[self._position(old)]
        old.parent = None
        self._changed(old.start, old.end, parent)

    def request_region(self, start: int, n: int, name: str, flags: int = 0,
                       parent: Resource | None = None, name_id: object = None) -> Resource:
        """__request_region(): claim a busy region, nesting below non-busy resources."""
        parent = parent or self.root
        res = Resource(start, start + n - 1, name, name_id=name_id)
        if n <= 0:
            raise ResourceConflict(f"__request_region: {name!r} at {start:#x} has size {n}", errno.EINVAL)
        while True:
            res.flags = (parent.flags & (IORESOURCE_TYPE_BITS | IORESOURCE_EXT_TYPE_BITS)) | IORESOURCE_BUSY | flags
            res.desc = parent.desc
            conflict = self._request_conflict(parent, res)
            if conflict is None:
                return res
            if conflict is not parent and not conflict.flags & IORESOURCE_BUSY:
                parent = conflict
                continue
            raise ResourceConflict(_conflict_text("__request_region", res, conflict, parent))

    def _busy_holder(self, start: int, end: int, mem_only: bool = False) -> Resource | None:
        """The descent of __release_region() and release_mem_region_adjustable().

        Goes down through non-busy resources that contain [start, end] and
        returns the first busy one, or None (also when `mem_only` and a
        non-MEM resource is met first).
        """
        node = self.root
        while True:
            r = next((c for c in _index(node).overlapping(start, end) if c.start <= start and c.end >= end), None)
            if r is None or (mem_only and not r.flags & IORESOURCE_MEM):
                return None
            if r.flags & IORESOURCE_BUSY:
                return r
            node = r

    def release_region(self, start: int, n: int) -> None:
        """__release_region(): free the busy region that is exactly [start, start+n-1]."""
        end = start + n - 1
        r = self._busy_holder(start, end)
        if r is None or r.start != start or r.end != end:
            raise ResourceConflict(f"Trying to free nonexistent resource <{start:#018x}-{end:#018x}>",
                                   errno.EINVAL)
        self.release_resource(r)

    def release_mem_region_adjustable(self, start: int, size: int) -> None:
        """release_mem_region_adjustable(): cut [start, +size) out of the busy RAM resource holding it."""
        end = start + size - 1
        res = self._busy_holder(start, end, mem_only=True)
        if res is None:
            raise ResourceConflict(f"release_mem_region_adjustable: nothing holds [{start:#x}-{end:#x}]",
                                   errno.EINVAL)
        if any(c.overlaps(start, end) for c in res.children):
            raise ResourceConflict(f"release_mem_region_adjustable: {res.label()} has children in "
                                   f"[{start:#x}-{end:#x}]")
        parent = res.parent
        assert parent is not None
        if res.start == start and res.end == end:
            self.release_resource(res)
            return
        if res.start == start:
            res.start = end + 1
        elif res.end == end:
            res.end = start - 1
        else:
            tail = Resource(end + 1, res.end, res.name, res.flags, res.desc, name_id=res.name_id)
            res.end = start - 1
            self._insert_child(parent, tail)
        self._changed(start, end, parent)

    # -- memory hotplug ----------------------------------------------------

    def merge_system_ram_resource(self, res: Resource) -> Resource:
        """merge_system_ram_resource(): fold `res` into adjacent mergeable siblings.

        Returns the resource that now covers `res`'s range.
        """
        want = IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY
        if res.flags & want != want:
            raise ResourceConflict(f"merge_system_ram_resource: {res.label()} is not busy System RAM",
                                   errno.EINVAL)
        res.flags |= IORESOURCE_SYSRAM_MERGEABLE
        parent = res.parent
        assert parent is not None
        kids = parent.children
        pos = self._position(res)
        if pos + 1 < len(kids) and _mergeable(res, kids[pos + 1]):
            res.end = kids[pos + 1].end
            kids[pos + 1].parent = None
            del kids[pos + 1]
        if pos > 0 and _mergeable(kids[pos - 1], res):
            kids[pos - 1].end = res.end
            res.parent = None
            del kids[pos]
            res = kids[pos - 1]
        self._changed(res.start, res.end, parent)
        return res

    # -- queries -----------------------------------------------------------

    def region_intersects(self, start: int, size: int, flags: int, desc: int = IORES_DESC_NONE,
                          descend: bool = True) -> int:
        """region_intersects(): classify [start, start+size-1] against matching resources.

        descend=True is the algorithm of b4afe4183ec7 (mainline 6.12, stable
        6.1.115+): a non-matching top-level resource counts as "other" only if
        matching descendants do not cover its part of the range. descend=False
        is the older one that looks at top-level resources only.
        """
        end = start + size - 1
        type_ = other = 0
        for p in _index(self.root).overlapping(start, end):
            if _type_match(p, flags, desc):
                type_ += 1
                continue
            if not descend:
                other += 1
                continue
            o_start, o_end = max(start, p.start), min(end, p.end)
            covered = False
            for d in self.overlapping(start, end, root=p):
                if not _type_match(d, flags, desc):
                    continue
                type_ += 1
                if d.start > o_start:
                    break
                if d.end >= o_end:
                    covered = True
                    break
                o_start = max(o_start, d.end + 1)
            if not covered:
                other += 1
        if type_ == 0:
            return REGION_DISJOINT
        return REGION_INTERSECTS if other == 0 else REGION_MIXED

    def walk_iomem_res_desc(self, desc: int, flags: int, start: int, end: int) -> Iterator[Resource]:
        """walk_iomem_res_desc(): resources matching flags/desc overlapping [start, end], as the kernel visits them.

        Each step is find_next_iomem_res(): the first match in pre-order
        from `start`; the walk goes on after that resource's end, so a match
        nested in a match (the kernel image in RAM) is not visited again.
        """
        while start <= end:
            r = next((r for r in self.overlapping(start, end) if _type_match(r, flags, desc)), None)
            if r is None:
                return
            yield r
            start = r.end + 1

    def walk_system_ram_res(self, start: int = 0, end: int = (1 << 64) - 1) -> Iterator[Resource]:
        """walk_system_ram_res(): busy System RAM overlapping [start, end]."""
        return self.walk_iomem_res_desc(IORES_DESC_NONE, IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY, start, end)

    def page_is_ram(self, pfn: int) -> bool:
        """page_is_ram(): walk_system_ram_range() finds a range covering the whole page."""
        start = pfn * PAGE_SIZE
        end = start + PAGE_SIZE - 1
        return any(r.start <= start and r.end >= end for r in self.walk_system_ram_res(start, end))

    def iomem_is_exclusive(self, addr: int, *, strict: bool, io_strict: bool,
                           exclusive_system_ram: bool = True) -> Resource | None:
        """iomem_is_exclusive(): the resource that makes addr's page exclusive, if any.

        exclusive_system_ram=True is Linux >= 5.16 (a9e7b8d4f663): a
        MEM|SYSRAM|EXCLUSIVE resource refuses access busy or not, whatever
        iomem= says. False is the rule before it.
        """
        page = addr & PAGE_MASK
        for p in self.overlapping(page, page + PAGE_SIZE - 1):
            if exclusive_system_ram and p.flags & (IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE) == (
                    IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE):
                return p
            if not strict or not p.flags & IORESOURCE_BUSY:
                continue
            if io_strict or p.flags & IORESOURCE_EXCLUSIVE:
                return p
        return None

    def boundaries(self) -> Iterator[tuple[int, int]]:
        """(start, end) of every resource; what derived range maps are cut at."""
        for r, _ in self.walk():
            yield r.start, r.end


def _mergeable(a: Resource, b: Resource) -> bool:
    """system_ram_resources_mergeable(): same flags, name pointer, desc; adjacent; childless."""
    return (a.flags == b.flags and a.end + 1 == b.start and a.name_id is b.name_id
            and a.name == b.name and a.desc == b.desc and not a.children and not b.children)


def _conflict_text(op: str, new: Resource, conflict: Resource, parent: Resource) -> str:
    if conflict is parent:
        return f"{op}: {new.label()} does not fit inside {parent.label()}"
    return f"{op}: {new.label()} conflicts with {conflict.label()}"
