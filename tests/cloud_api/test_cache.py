"""The bounded LRU map behind the result cache and the answers memo (cachetools underneath)."""

from __future__ import annotations

from cloud_api.api.cache import LruMap


def test_entries_are_bounded_least_recently_used_first() -> None:
    lru: LruMap[str, int] = LruMap(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recently used
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)


def test_bytes_are_bounded_and_accounted() -> None:
    lru: LruMap[str, bytes] = LruMap(100, max_bytes=10, size=len)
    lru.put("a", b"aaaa")
    lru.put("b", b"bbbb")
    lru.put("c", b"cccc")  # 12 bytes: the oldest goes
    assert lru.get("a") is None and len(lru) == 2 and lru.bytes == 8
    lru.put("b", b"b")  # replacing a value counts its new size only
    assert lru.bytes == 5
    lru.pop("c")
    assert lru.bytes == 1 and len(lru) == 1
    lru.put("huge", b"x" * 11)  # larger than the whole budget: not kept, the rest stays
    assert lru.get("huge") is None and lru.get("b") == b"b" and lru.bytes == 1
