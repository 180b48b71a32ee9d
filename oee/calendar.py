"""The shift calendar: which instants are planned, in which shift, in the plant's time zone.

Shifts and breaks are local wall-clock times converted to UTC day by day, so days of 23 or
25 hours and night shifts across midnight come out right.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from oee.config import WEEKDAYS, ShiftSpec

_SEARCH_DAYS = 9  # a weekly calendar repeats within 7 days; 9 covers a shift across midnight


@dataclass(frozen=True)
class Window:
    """A stretch [start, end) in UTC with one planning status (a shift or off-plan)."""

    start: datetime
    end: datetime
    shift: str | None  # None: off plan (outside every shift or inside a break)
    shift_start: datetime | None
    shift_end: datetime | None = None

    @property
    def planned(self) -> bool:
        return self.shift is not None


@dataclass(frozen=True)
class _Occurrence:
    name: str
    start: datetime
    end: datetime
    breaks: tuple[tuple[datetime, datetime], ...]


class ShiftCalendar:
    """Answers 'which planning window contains t' for a list of shifts in a time zone."""

    def __init__(self, shifts: list[ShiftSpec], timezone: str) -> None:
        self.shifts = shifts
        self.zone = ZoneInfo(timezone)
        self._cache: dict[date, list[_Occurrence]] = {}

    def _local(self, day: date, clock: time) -> datetime:
        # A wall time skipped by DST (02:30 on the spring day) resolves with the offset
        # before the change (fold=0), i.e. one hour later on the clock: 03:30.
        return datetime.combine(day, clock, tzinfo=self.zone).astimezone(UTC)

    def _occurrences(self, day: date) -> list[_Occurrence]:
        """Shift occurrences that START on the local date `day`."""
        cached = self._cache.get(day)
        if cached is not None:
            return cached
        result: list[_Occurrence] = []
        weekday = WEEKDAYS[day.weekday()]
        for shift in self.shifts:
            if weekday not in shift.days:
                continue
            start = self._local(day, shift.start)
            end_day = day + timedelta(days=1) if shift.end <= shift.start else day
            end = self._local(end_day, shift.end)
            breaks: list[tuple[datetime, datetime]] = []
            for brk in shift.breaks:
                b_day = day + timedelta(days=1) if brk.start < shift.start else day
                b_start = self._local(b_day, brk.start)
                b_end_day = b_day + timedelta(days=1) if brk.end <= brk.start else b_day
                b_end = self._local(b_end_day, brk.end)
                b_start, b_end = max(b_start, start), min(b_end, end)
                if b_start < b_end:
                    breaks.append((b_start, b_end))
            result.append(_Occurrence(shift.name, start, end, tuple(sorted(breaks))))
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[day] = result
        return result

    def window_at(self, t: datetime) -> Window:
        """The maximal window of constant planning status that contains instant t."""
        if t.tzinfo is None:
            raise ValueError("window_at needs an aware datetime (UTC)")
        local_day = t.astimezone(self.zone).date()
        # A shift lasts at most one day and starts on its own local date, so the shift
        # holding t started on day-1 or day 0; days -2..+2 hold both neighbouring edges
        # unless the calendar has gaps (weekends, no shifts), handled by widening below.
        occurrences = [
            occ
            for offset in range(-2, 3)
            for occ in self._occurrences(local_day + timedelta(offset))
        ]
        for occ in occurrences:
            if occ.start <= t < occ.end and not any(s <= t < e for s, e in occ.breaks):
                lo = max([occ.start, *[e for _, e in occ.breaks if e <= t]])
                hi = min([occ.end, *[s for s, _ in occ.breaks if s > t]])
                return Window(lo, hi, occ.name, occ.start, occ.end)
        lo_edge = self._edge(occurrences, t, before=True)
        hi_edge = self._edge(occurrences, t, before=False)
        reach = 2
        while (lo_edge is None or hi_edge is None) and reach < _SEARCH_DAYS:
            reach += 1
            if lo_edge is None:
                lo_edge = self._edge(self._occurrences(local_day - timedelta(reach)), t, True)
            if hi_edge is None:
                hi_edge = self._edge(self._occurrences(local_day + timedelta(reach)), t, False)
        # No shift within the search horizon: bound the window at whole UTC days, which are
        # aligned to every bucket length, so buckets stay aligned to UTC minutes.
        day0 = datetime.combine(t.astimezone(UTC).date(), time(0), tzinfo=UTC)
        lo = lo_edge if lo_edge is not None else day0
        hi = hi_edge if hi_edge is not None else day0 + timedelta(days=1)
        return Window(lo, hi, None, None)

    @staticmethod
    def _edge(occurrences: list[_Occurrence], t: datetime, before: bool) -> datetime | None:
        """The nearest shift or break edge <= t (before) or > t (after) among occurrences."""
        edges: list[datetime] = []
        for occ in occurrences:
            edges.extend((occ.start, occ.end))
            for b_start, b_end in occ.breaks:
                edges.extend((b_start, b_end))
        if before:
            return max((e for e in edges if e <= t), default=None)
        return min((e for e in edges if e > t), default=None)

    def windows(self, start: datetime, end: datetime) -> list[Window]:
        """Windows covering [start, end) exactly, clipped to it."""
        result: list[Window] = []
        t = start
        while t < end:
            w = self.window_at(t)
            clipped = Window(t, min(w.end, end), w.shift, w.shift_start, w.shift_end)
            result.append(clipped)
            t = clipped.end
        return result
