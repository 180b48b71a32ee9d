"""`oee.events.count_event`, the engine's way to make a count event: the same event as
`CountEvent(...)` (same fields, same stored JSON) for every input, and the same refusal
for what the event's field check refuses, whether or not it takes the path without the
check; and what it makes, ingest's validation (pydantic) takes as the same event."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from oee.bounds import MAX_ID_CHARS, MAX_INT, MAX_TEXT_CHARS
from oee.checking import build_unchecked
from oee.events import CountEvent, FieldValueError, count_event, dump_events, load_events

COUNT_ADAPTER = TypeAdapter(CountEvent)

AT = datetime(2026, 12, 5, 6, 30, 15, 123456, tzinfo=UTC)
PLAIN: dict[str, Any] = {
    "agent_id": "edge-01",
    "site_id": "plant-01",
    "equipment_id": "press-1",
    "ts": AT,
    "produced": 1,
    "good": 1,
    "scrap": 0,
    "rework": 0,
    "product": None,
    "scrap_reason": None,
    "in_plan": True,
}

texts = st.one_of(
    st.text(max_size=8),
    st.text(min_size=MAX_TEXT_CHARS - 1, max_size=MAX_TEXT_CHARS + 2, alphabet="ab\x00é"),
    st.sampled_from(["", "A-42 blue", "Ausschuss: Grat", "\x00", "a\ud800b", "\u00e9" * 201]),
)
ids = st.one_of(
    st.sampled_from(["", "m", "press-1", "x" * MAX_ID_CHARS, "x" * (MAX_ID_CHARS + 1), "a\x00"]),
    st.text(max_size=4),
)
ints = st.one_of(
    st.integers(min_value=-5, max_value=5),
    st.sampled_from([MAX_INT, MAX_INT + 1, -MAX_INT, -MAX_INT - 1, 2**32, True, False]),
)
times = st.one_of(
    st.just(AT),
    st.just(AT.replace(tzinfo=None)),
    st.just(AT.replace(tzinfo=timezone(timedelta(hours=1)))),
    st.just(AT.replace(tzinfo=timezone.utc)),  # noqa: UP017 (another object than UTC)
    st.just(AT.replace(month=1, tzinfo=ZoneInfo("Europe/London"))),  # offset 0, not UTC
    st.just("2026-12-05T06:30:15Z"),
)


def stored(event: CountEvent, event_id: str) -> bytes:
    """The stored JSON of `event` with its id replaced (ids differ between two events)."""
    values = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    return dump_events([build_unchecked(CountEvent, **values | {"event_id": event_id})])


@settings(max_examples=400, deadline=None)
@given(
    agent_id=ids,
    site_id=ids,
    equipment_id=ids,
    ts=times,
    produced=ints,
    good=ints,
    scrap=ints,
    rework=ints,
    product=st.none() | texts,
    scrap_reason=st.none() | texts,
    in_plan=st.one_of(st.booleans(), st.sampled_from([1, 0, "yes"])),
)
def test_the_same_event_or_the_same_refusal(**fields: Any) -> None:
    try:
        expected = CountEvent(**fields)
    except FieldValueError as exc:
        with pytest.raises(FieldValueError) as got:
            count_event(**fields)
        assert str(got.value) == str(exc)
        return
    event = count_event(**fields)
    assert type(event) is CountEvent
    assert event == dataclasses.replace(expected, event_id=event.event_id)
    assert stored(event, "0") == stored(expected, "0")
    # Ingest's validation takes the same fields as the same event.
    assert COUNT_ADAPTER.validate_python({**fields, "event_id": event.event_id}) == event
    assert uuid.UUID(event.event_id).version == 7
    # What ingest reads back is the event itself.
    assert load_events(dump_events([event])) == [event]


def test_plain_values_take_the_path_without_validation() -> None:
    # The engine's common case; the unvalidated path keeps the very objects it was given.
    event = count_event(**PLAIN)
    assert event.ts is AT
    assert dump_events([event]).startswith(b'[{"event_id":"')
    assert stored(event, "0") == stored(CountEvent(**PLAIN), "0")


def test_the_event_is_frozen() -> None:
    event = count_event(**PLAIN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.good = 2  # type: ignore[misc]
