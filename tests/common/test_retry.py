"""The one backoff policy: capped, doubling, jittered into [0.5, 1] of the delay."""

from __future__ import annotations

from common.retry import Backoff, jittered


def test_delays_double_up_to_the_cap() -> None:
    plain = Backoff(0.5, 30.0, jitter=False)
    assert [plain.delay(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert plain.delay(10_000) == 30.0  # no overflow for a long outage
    assert plain.delay(-1) == 0.5
    few = Backoff(1.0, 10_000.0, jitter=False, doublings=3)
    assert few.delay(10) == 8.0


def test_jitter_stays_within_half_and_whole() -> None:
    backoff = Backoff(2.0, 60.0)
    for attempt in range(12):
        base = backoff.base(attempt)
        for _ in range(50):
            assert 0.5 * base <= backoff.delay(attempt) <= base
    assert all(1.5 <= jittered(3.0) <= 3.0 for _ in range(100))
