"""Part quantities: how an increment of one configured counter changes produced, good,
scrap and rework (OEE.md, Quantities). The engine's buckets and its `count` events both
follow this one definition, so count events summed over any window equal the buckets.

Every bucket keeps produced = good + scrap + rework. The quantity that no counter measures is
derived: with a total counter and a scrap counter, a part counts as good when it is counted
and moves to scrap when the scrap counter counts it; with a total counter and a good counter,
a part counts as scrap until the good counter counts it. Without a total counter, produced is
the sum of the good, scrap and rework counters.
"""

from __future__ import annotations

from collections.abc import Collection

COUNTER_SIGNALS: tuple[str, ...] = ("total_count", "good_count", "scrap_count", "rework_count")

# (produced, good, scrap, rework) per part counted by one counter.
Effect = tuple[int, int, int, int]


def counter_model_error(counters: Collection[str]) -> str | None:
    """Why these counters cannot define produced, good, scrap and rework (None: they can)."""
    has = set(counters)
    if "total_count" in has:
        if "good_count" in has and "scrap_count" in has:
            return (
                "with total_count, configure good_count or scrap_count, not both "
                "(the other is derived)"
            )
        return None
    if "good_count" not in has:
        return (
            "produced parts cannot be derived: configure total_count, or good_count "
            "(optionally with scrap_count and rework_count)"
        )
    return None


def counter_effects(counters: Collection[str]) -> dict[str, Effect]:
    """Per configured counter, the change of (produced, good, scrap, rework) per part."""
    problem = counter_model_error(counters)
    if problem is not None:
        raise ValueError(problem)
    has = set(counters)
    effects: dict[str, Effect] = {}
    if "total_count" in has:
        by_good = "good_count" in has
        # The derived quantity absorbs every part until its own counter claims it.
        effects["total_count"] = (1, 0, 1, 0) if by_good else (1, 1, 0, 0)
        if by_good:
            effects["good_count"] = (0, 1, -1, 0)
        if "scrap_count" in has:
            effects["scrap_count"] = (0, -1, 1, 0)
        if "rework_count" in has:
            effects["rework_count"] = (0, 0, -1, 1) if by_good else (0, -1, 0, 1)
    else:
        effects["good_count"] = (1, 1, 0, 0)
        if "scrap_count" in has:
            effects["scrap_count"] = (1, 0, 1, 0)
        if "rework_count" in has:
            effects["rework_count"] = (1, 0, 0, 1)
    return effects
