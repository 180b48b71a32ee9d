"""The live plant view's pure parts (cloud_api/routes/live.py): which shift a tile shows, how
often an agent reports, the ideal count. The route itself runs against PostgreSQL and
Chromium in tests/ops/test_live_dashboard.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cloud_api.api.queries import hh_mm
from cloud_api.api.routes.live import (
    DEFAULT_STATUS_INTERVAL_S,
    ideal_count,
    shift_of,
    status_interval,
)
from common.checks import jsonable, validate
from oee.calendar import ShiftCalendar
from oee.config import ShiftSpec

BERLIN = ZoneInfo("Europe/Berlin")
SHIFTS = [
    validate(
        ShiftSpec,
        {
            "name": "early",
            "start": "06:00",
            "end": "14:00",
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "breaks": [{"start": "09:00", "end": "09:15"}],
        },
    ),
    validate(
        ShiftSpec,
        {"name": "night", "start": "22:00", "end": "06:00", "days": ["mon", "tue", "wed", "thu"]},
    ),
]
CALENDAR = ShiftCalendar(SHIFTS, "Europe/Berlin")


def local(day: int, hour: int, minute: int = 0) -> datetime:
    """An instant of the week of Monday 2026-11-16 in Berlin time."""
    return datetime(2026, 11, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


def test_the_shift_of_a_tile_is_the_newest_that_started_in_a_break_or_after_it_ended() -> None:
    early = ("early", local(18, 6), local(18, 14))
    assert shift_of(CALENDAR, local(18, 7)) == early
    assert shift_of(CALENDAR, local(18, 9, 5)) == early  # in the break
    assert shift_of(CALENDAR, local(18, 15)) == early  # between shifts: the one that ended
    assert shift_of(CALENDAR, local(18, 23)) == ("night", local(18, 22), local(19, 6))
    # Saturday: the last shift of the week, Friday's early shift.
    assert shift_of(CALENDAR, local(21, 10)) == ("early", local(20, 6), local(20, 14))
    assert shift_of(ShiftCalendar([], "UTC"), local(18, 7)) is None


def test_a_calendar_as_the_agent_reports_it_reads_back_as_its_shifts() -> None:
    reported = [jsonable(s) for s in SHIFTS]
    assert reported[0]["start"] == "06:00:00"
    assert [validate(ShiftSpec, hh_mm(s)) for s in reported] == SHIFTS
    assert hh_mm({"name": "06:00:30", "n": 3}) == {"name": "06:00:30", "n": 3}


def test_how_often_an_agent_reports() -> None:
    now = datetime(2026, 11, 18, 12, tzinfo=UTC)
    reports = [now - timedelta(seconds=s) for s in (0, 12, 24, 37)]
    assert status_interval(10, reports) == (10.0, "reported")
    assert status_interval(2.5, []) == (2.5, "reported")
    # Not a usable interval: the gaps between the last reports decide.
    for bad in (None, 0, -5, True, "10"):
        assert status_interval(bad, reports) == (12.0, "observed"), bad
    assert status_interval(None, reports[:1]) == (DEFAULT_STATUS_INTERVAL_S, "default")


def test_the_ideal_count_is_the_planned_time_over_the_ideal_cycle_time() -> None:
    assert ideal_count({"ideal_cycle_time_s": 2.0, "products": {}}, 101.0) == 50
    assert ideal_count({"ideal_cycle_time_s": 2.0}, 0.0) == 0
    # Several products have several cycle times: no single ideal count.
    assert ideal_count({"ideal_cycle_time_s": 2.0, "products": {"A": 1.0}}, 100.0) is None
    for config in ({}, None, {"ideal_cycle_time_s": 0}, {"ideal_cycle_time_s": True}):
        assert ideal_count(config, 100.0) is None, config
