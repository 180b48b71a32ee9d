"""In-process caches of the read API: a bounded LRU map, and the result cache built on it.

The result cache holds results of closed windows, as JSON. A key holds the route, the
normalized query, the caller's visible sites and the data watermark of the scope and window
(cloud_api.queries.data_watermark). Late data bumps the watermark of the days it touches, so
a cached result is never served after its data changed, and results over other days stay
cached. Entries are evicted least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cloud_api import metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruMap(Generic[K, V]):
    """A bounded, thread-safe map that drops its least recently used entries.

    Bounded by entry count and, with `size` (bytes of a value), by total bytes too.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self._bytes = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        size = self._size(value) if self._size is not None else 0
        with self._lock:
            self._discard(key)
            if self.max_bytes is not None and size > self.max_bytes:
                return  # larger than the whole budget: not kept, and nothing else dropped
            self._items[key] = value
            self._bytes += size
            while len(self._items) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes and self._items
            ):
                self._discard(next(iter(self._items)))

    def pop(self, key: K) -> None:
        with self._lock:
            self._discard(key)

    def _discard(self, key: K) -> None:
        """With the lock held."""
        value = self._items.pop(key, None)
        if value is not None and self._size is not None:
            self._bytes -= self._size(value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class ResultCache(LruMap[Hashable, bytes]):
    """Query key -> result payload as JSON, counting hits and misses for /metrics."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        super().__init__(max_entries, max_bytes=max_bytes, size=len)

    def get(self, key: Hashable) -> bytes | None:
        value = super().get(key)
        metrics.CACHE_REQUESTS.labels("miss" if value is None else "hit").inc()
        return value
