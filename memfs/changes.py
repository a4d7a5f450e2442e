"""The one signal that says what a physical range reads as may have changed.

Raised where memory actually changes (the virtio-mem device discarding or
plugging blocks, memory hotplug adding or removing ranges), so no caller can
forget it; heard by whoever caches what the range read as (the FUSE adapter
revokes cached pages and live mappings).
"""
from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[int, int], None]


class MemoryChanged:
    """Listeners called with (start, size) after a physical range changed."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def connect(self, listener: Listener) -> None:
        """Call `listener(start, size)` on every later change."""
        self._listeners.append(listener)

    def __call__(self, start: int, size: int) -> None:
        for listener in self._listeners:
            listener(start, size)
