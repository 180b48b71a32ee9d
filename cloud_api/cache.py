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
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from cloud_api import metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruMap(Generic[K, V]):
    """A bounded, thread-safe map that drops its least recently used entries."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class ResultCache(LruMap[Hashable, Any]):
    """Query key -> result payload, counting hits and misses for /metrics."""

    def __init__(self, max_entries: int = 10_000) -> None:
        super().__init__(max_entries)

    def get(self, key: Hashable) -> Any | None:
        value = super().get(key)
        metrics.CACHE_REQUESTS.labels("miss" if value is None else "hit").inc()
        return value
