"""The agent's status event rides the commit of the minute's closed buckets: it is due at the
first flush of each status_interval slot of the wall clock (agent/runtime.py StatusCadence)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.runtime import StatusCadence

T0 = datetime(2026, 3, 2, 8, 0, 0, 400_000, tzinfo=UTC)  # 0.4 s after a minute began


def test_status_goes_in_the_first_flush_of_each_minute_like_the_bucket_close() -> None:
    cadence = StatusCadence(60.0)
    sent = []
    mono = 1000.0
    # Flushes a little more than a second apart (the flush takes time): their phase drifts
    # within the minute, the status still goes once a minute, in the minute's first flush.
    for i in range(400):
        now = T0 + timedelta(seconds=1.07 * i)
        if cadence.due(now, mono + 1.07 * i):
            sent.append(now)
    assert sent[0] == T0  # at start
    minutes = [s.replace(second=0, microsecond=0) for s in sent]
    assert len(set(minutes)) == len(minutes) == len(sent)
    for s in sent[1:]:
        # The first flush of its minute: the previous flush (1.07 s earlier) was in the
        # minute before, where the bucket that closes here was still open.
        assert s.second == 0 or (s - timedelta(seconds=1.07)).minute != s.minute
        assert s.second < 2
    assert len(sent) == 1 + (T0 + timedelta(seconds=1.07 * 399)).minute - T0.minute


def test_a_clock_that_stands_still_or_jumps_back_still_gives_a_status() -> None:
    cadence = StatusCadence(60.0)
    assert cadence.due(T0, 0.0)
    assert not cadence.due(T0 + timedelta(seconds=20), 20.0)
    # The wall clock stands still: a status once two intervals of monotonic time went by.
    assert not cadence.due(T0 + timedelta(seconds=20), 119.0)
    assert cadence.due(T0 + timedelta(seconds=20), 120.0)
    # Stepped back an hour: another slot, a status at once (not an hour later).
    assert cadence.due(T0 - timedelta(hours=1), 121.0)
    assert not cadence.due(T0 - timedelta(hours=1, seconds=-5), 126.0)
