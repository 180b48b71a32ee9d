"""`queries.whole_hour_zone` (which decides whether hourly rollups can serve a window) gives
the answer of looking at the zone's offset every 30 minutes of the window, for zones with
half-hour and 45-minute offsets, a half-hour DST shift, whole-hour zones, and windows at the
edges of the calendar."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cloud_api.api.queries import whole_hour_zone
from cloud_api.api.routes.common import EARLIEST, LATEST

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/Chicago",
    "America/Santiago",
    "Asia/Kolkata",  # +05:30 all year
    "Asia/Kathmandu",  # +05:45
    "America/St_Johns",  # -03:30 / -02:30
    "Australia/Lord_Howe",  # +10:30 / +11:00: whole hours only in summer
    "Asia/Pyongyang",  # +09:00, +08:30 from 2015-08-15 to 2018-05-04
)


def dense(tz: ZoneInfo, start: datetime, end: datetime) -> bool:
    t = start
    while True:
        offset = t.astimezone(tz).utcoffset()
        if offset is None or offset.total_seconds() % 3600:
            return False
        if t >= end:
            return True
        t = min(end, t + timedelta(minutes=30))


def test_same_answer_as_looking_every_30_minutes() -> None:
    rnd = random.Random(20)
    checked = {True: 0, False: 0}
    for name in ZONES:
        tz = ZoneInfo(name)
        for _ in range(60):
            start = datetime(2013, 1, 1, tzinfo=UTC) + timedelta(minutes=rnd.randrange(7 * 525600))
            end = start + timedelta(minutes=rnd.choice((60, 1440, 10080, 44640, 525600)))
            expected = dense(tz, start, end)
            assert whole_hour_zone(tz, start, end) is expected, (name, start, end)
            checked[expected] += 1
    # Both answers were exercised (Lord Howe in summer only, Pyongyang before 2015).
    assert checked[True] > 100 and checked[False] > 100


def test_windows_at_the_edges_of_the_calendar() -> None:
    for name in ("Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata", "Europe/Berlin"):
        tz = ZoneInfo(name)
        for start, end in (
            (LATEST - timedelta(days=40), LATEST),
            (EARLIEST, EARLIEST + timedelta(days=40)),
        ):
            assert whole_hour_zone(tz, start, end) is dense(tz, start, end), (name, start)
