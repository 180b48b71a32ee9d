"""The result cache of the read API: rendered results of closed windows, in process memory.

A key holds the route, the normalized query, the caller's visible sites and the data
watermark of the scope and window (cloud_api.queries.data_watermark). Late data bumps the
watermark of the days it touches, so a cached result is never served after its data
changed, and results over other days stay cached. Entries are evicted least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from cloud_api import metrics


class ResultCache:
    """A bounded, thread-safe LRU map from a query key to its result payload."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                metrics.CACHE_REQUESTS.labels("miss").inc()
                return None
            self._items.move_to_end(key)
        metrics.CACHE_REQUESTS.labels("hit").inc()
        return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
