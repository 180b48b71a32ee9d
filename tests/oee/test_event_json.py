"""`oee.events.dump_events`, the JSON of a batch's events (the agent's plaintext and what
ingest stores): byte for byte what the list adapter writes, for the events the engine makes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticSerializationError

from connectors.sample import Sample
from oee.events import EVENT_LIST_ADAPTER, count_event, dump_events, load_events
from tests.oee.test_count_event import PLAIN, ids, ints, texts
from tests.oee.test_properties import clean_run, timelines


@settings(max_examples=150, deadline=None)
@given(timelines(), st.sampled_from(["performance", "availability"]))
def test_the_engines_events_dump_as_the_list_adapter_dumps_them(
    samples: list[Sample], mode: str
) -> None:
    events = clean_run(samples, mode)
    kinds = {e.kind for e in events}
    assert "oee" in kinds  # the run closes buckets, whatever the samples
    data = dump_events(events)
    assert data == EVENT_LIST_ADAPTER.dump_json(events)
    assert load_events(data) == events


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
        except ValueError:  # refused as the model refuses it (tests/oee/test_count_event.py)
            continue
    assert dump_events(events) == EVENT_LIST_ADAPTER.dump_json(events)


def test_a_list_with_something_else_goes_through_the_adapter() -> None:
    events: list[Any] = clean_run([], "performance")
    assert events
    foreign: Any = object()
    with pytest.raises(PydanticSerializationError):
        EVENT_LIST_ADAPTER.dump_json([*events, foreign])
    with pytest.raises(PydanticSerializationError):
        dump_events([*events, foreign])
    assert dump_events([]) == EVENT_LIST_ADAPTER.dump_json([]) == b"[]"
