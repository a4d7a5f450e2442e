"""`/proc/iomem` text: the kernel's r_show() format and a parser for real dumps (spec section 3)."""
from __future__ import annotations

import re

from .ioport import Resource
from .resource import MAX_IORES_LEVEL, ResourceTree

_LINE = re.compile(r"( *)([0-9a-f]+)-([0-9a-f]+) : (.*)")


class IomemParseError(ValueError):
    """A line that /proc/iomem could not have printed; names the line number."""

    def __init__(self, lineno: int, message: str, line: str) -> None:
        super().__init__(f"line {lineno}: {message}: {line!r}")
        self.lineno = lineno


def render(tree: ResourceTree, privileged: bool) -> str:
    """r_show() for every resource: two spaces a level (capped at 5), 8+ hex digits.

    An opener without CAP_SYS_ADMIN sees every address as zero.
    """
    width = 4 if tree.root.end < 0x10000 else 8
    if privileged:
        line = f"%s%0{width}x-%0{width}x : %s\n"
    else:
        line = f"%s{0:0{width}x}-{0:0{width}x} : %s\n"
    indents = ["  " * min(depth, MAX_IORES_LEVEL) for depth in range(MAX_IORES_LEVEL + 1)]
    lines: list[str] = []
    append = lines.append
    # pre-order, as tree.walk(), without a tuple per resource: one iterator per open level
    stack = [iter(tree.root.children)]
    while stack:
        depth = len(stack) - 1
        indent = indents[min(depth, MAX_IORES_LEVEL)]
        for r in stack[-1]:
            name = "<BAD>" if r.name is None else r.name
            append(line % (indent, r.start, r.end, name) if privileged else line % (indent, name))
            if r.children:
                stack.append(iter(r.children))
                break
        else:
            stack.pop()
    return "".join(lines)


def parse(text: str) -> ResourceTree:
    """Build a tree from /proc/iomem text so that render(parse(t), True) == t.

    Lines keep their order and nesting as printed, odd as real dumps can be
    (zero ranges outside their parent, overlapping siblings). Lines printed at
    the depth cap are nested below the closest earlier capped line that
    contains them, which is where the kernel had them. Flags are left as
    plain MEM; `memfs.infer` assigns them.
    """
    tree = ResourceTree()
    if text and not text.endswith("\n"):
        raise IomemParseError(text.count("\n") + 1, "missing final newline", text.rsplit("\n", 1)[-1])
    stack: list[Resource] = [tree.root]  # stack[d] = the open resource at depth d-1
    # split on \n only: names may hold any other character, \r and \u2028 included
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        m = _LINE.fullmatch(line)
        if not m:
            raise IomemParseError(lineno, "expected 'START-END : NAME' with lower-case hex", line)
        spaces, start_hex, end_hex, name = m.groups()
        if len(spaces) % 2:
            raise IomemParseError(lineno, "odd indentation", line)
        for digits in (start_hex, end_hex):
            # r_show prints %0*llx with width 8: no shorter, no extra leading zeros
            if len(digits) < 8 or (len(digits) > 8 and digits[0] == "0") or len(digits) > 16:
                raise IomemParseError(lineno, f"{digits!r} is not an address as the kernel prints it", line)
        depth = len(spaces) // 2
        if depth > MAX_IORES_LEVEL:
            raise IomemParseError(lineno, f"indented deeper than the kernel's cap of {MAX_IORES_LEVEL}", line)
        if depth > len(stack) - 1:
            raise IomemParseError(lineno, "indented more than one level below the line before", line)
        r = Resource(int(start_hex, 16), int(end_hex, 16), name)
        if depth < MAX_IORES_LEVEL:
            del stack[depth + 1:]
        else:
            while len(stack) > MAX_IORES_LEVEL + 1 and not _contains(stack[-1], r):
                stack.pop()
        parent = stack[-1]
        r.parent = parent
        parent.children.append(r)
        stack.append(r)
    return tree


def _contains(outer: Resource, inner: Resource) -> bool:
    return outer.start <= inner.start and inner.end <= outer.end
