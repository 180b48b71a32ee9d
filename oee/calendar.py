"""The shift calendar: which instants are planned, in which shift, in the plant's time zone.

Shifts and breaks are local wall-clock times converted to UTC day by day, so days of 23 or
25 hours and night shifts across midnight come out right.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from oee.config import WEEKDAYS, ShiftSpec


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

    def _local(self, day: date, clock: object) -> datetime:
        from datetime import time as _time

        assert isinstance(clock, _time)
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
        local_day = t.astimezone(self.zone).date()
        edges: list[datetime] = []
        found: tuple[_Occurrence, datetime, datetime] | None = None
        for offset in (-1, 0, 1):
            for occ in self._occurrences(local_day + timedelta(days=offset)):
                edges.extend((occ.start, occ.end))
                for b_start, b_end in occ.breaks:
                    edges.extend((b_start, b_end))
                if found is None and occ.start <= t < occ.end:
                    in_break = next(((s, e) for s, e in occ.breaks if s <= t < e), None)
                    if in_break is None:
                        # planned: from the latest edge <= t to the next edge > t, inside occ
                        lo = max([occ.start, *[e for _, e in occ.breaks if e <= t]])
                        hi = min([occ.end, *[s for s, _ in occ.breaks if s > t]])
                        found = (occ, lo, hi)
        if found is not None:
            occ, lo, hi = found
            return Window(lo, hi, occ.name, occ.start, occ.end)
        # Off plan: bounded by the nearest edges around t (or a day away when none are near).
        before = [e for e in edges if e <= t]
        after = [e for e in edges if e > t]
        lo = max(before) if before else t - timedelta(days=1)
        hi = min(after) if after else t + timedelta(days=1)
        return Window(lo, hi, None, None)

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
