"""A small thread-safe least-recently-used cache, for the engine's per-model caches.

Example::

    >>> cache = LruCache(2)
    >>> _ = cache.put("a", 1), cache.put("b", 2), cache.get("a"), cache.put("c", 3)
    >>> cache.get("b") is None
    True
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, Iterator


class LruCache:
    """At most ``size`` entries; the least recently used is dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def values(self) -> Iterator[Any]:
        with self._lock:
            return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
