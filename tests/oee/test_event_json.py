"""`oee.events.dump_events`, the JSON of a batch's events (the agent's plaintext and what
ingest stores): byte for byte what pydantic's list adapter writes of the same dataclasses,
whether written in plain Python (the agent, `dump_events_plain`) or by each class's pydantic
serializer (a process that validates events, ingest)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticSerializationError

from connectors.sample import Sample
from oee.bounds import MAX_FLOAT, MAX_INT
from oee.events import (
    EVENT_LIST_ADAPTER,
    AgentEvent,
    FieldValueError,
    SampleEvent,
    StateEvent,
    count_event,
    dump_events,
    dump_events_plain,
    load_events,
)
from tests.oee.test_count_event import PLAIN, ids, ints, texts
from tests.oee.test_properties import clean_run, timelines

T0 = datetime(2026, 12, 5, 6, 30, tzinfo=UTC)


def same_json(events: list[Any]) -> None:
    data = EVENT_LIST_ADAPTER.dump_json(events)
    assert dump_events_plain(events) == data
    assert dump_events(events) == data
    assert load_events(data) == events


@settings(max_examples=150, deadline=None)
@given(timelines(), st.sampled_from(["performance", "availability"]))
def test_the_engines_events_dump_as_the_list_adapter_dumps_them(
    samples: list[Sample], mode: str
) -> None:
    events = clean_run(samples, mode)
    kinds = {e.kind for e in events}
    assert "oee" in kinds  # the run closes buckets, whatever the samples
    same_json(events)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ids, texts, texts, ints), min_size=1, max_size=5))
def test_count_events_with_any_text_dump_as_the_list_adapter_dumps_them(
    fields: list[tuple[str, str, str, int]],
) -> None:
    events: list[Any] = []
    for equipment, product, reason, n in fields:
        given = {"equipment_id": equipment, "produced": n, "good": n}
        try:
            events.append(
                count_event(**{**PLAIN, **given, "product": product, "scrap_reason": reason})
            )
        except FieldValueError:  # refused (tests/oee/test_count_event.py)
            continue
    same_json(events)


numbers = st.one_of(
    st.floats(min_value=-MAX_FLOAT, max_value=MAX_FLOAT, allow_nan=False),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.integers(min_value=-MAX_INT, max_value=MAX_INT),
    st.sampled_from([0.0, -0.0, 1e-5, 9.99e-5, 1e-4, 1e-7, 1e16, 1e17, MAX_FLOAT, 5e-324]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.none() | numbers,
    value=st.none() | st.booleans() | numbers | st.text(max_size=10),
    reason=st.none() | st.text(max_size=10),
    data=st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    micros=st.integers(min_value=0, max_value=999_999),
)
def test_numbers_texts_and_times_dump_as_the_list_adapter_dumps_them(
    raw: float | None, value: Any, reason: str | None, data: dict[str, Any], micros: int
) -> None:
    ts = T0 + timedelta(microseconds=micros)
    events: list[Any] = []
    for make in (
        lambda: StateEvent(agent_id="a", site_id="s", ts=ts, state="fault", raw=raw, reason=reason),
        lambda: SampleEvent(agent_id="a", site_id="s", ts=ts, signal="x", value=value),
        lambda: AgentEvent(agent_id="a", site_id="s", ts=ts, code="c", message="m", data=data),
    ):
        try:
            events.append(make())
        except FieldValueError:  # a lone surrogate or a NUL among the generated texts
            continue
    same_json(events)


def test_a_list_with_something_else_is_refused() -> None:
    events: list[Any] = clean_run([], "performance")
    assert events
    foreign: Any = object()
    with pytest.raises(PydanticSerializationError):
        EVENT_LIST_ADAPTER.dump_json([*events, foreign])
    with pytest.raises(PydanticSerializationError):
        dump_events([*events, foreign])
    with pytest.raises(TypeError):
        dump_events_plain([*events, foreign])
    assert dump_events([]) == dump_events_plain([]) == EVENT_LIST_ADAPTER.dump_json([]) == b"[]"
