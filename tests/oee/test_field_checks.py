"""The agent's field check of events (oee.checking, plain Python) and ingest's validation
(pydantic, from the same `Check(...)` metadata) agree on hostile values: what the check
takes, pydantic takes as the same event; what pydantic refuses, the check refuses. For
values of the Python types the fields hold (no bool for a number, no text for a time), they
agree both ways; pydantic alone converts the others (lax mode), which the check refuses."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from oee.bounds import (
    MAX_CODE_CHARS,
    MAX_FLOAT,
    MAX_ID_CHARS,
    MAX_INT,
    MAX_MESSAGE_CHARS,
    MAX_TEXT_CHARS,
)
from oee.checking import FieldValueError
from oee.components import COMPONENT_FIELDS, INTEGER_FIELDS, Components
from oee.events import (
    EVENT_CLASSES,
    AgentEvent,
    CountEvent,
    OeeEvent,
    SampleEvent,
    StateEvent,
    uuid7,
)

AT = datetime(2026, 12, 5, 6, 30, 15, 123456, tzinfo=UTC)

# Values of the fields' own Python types, in bounds and out of them.
exact_ints = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([MAX_INT, MAX_INT + 1, -MAX_INT, -MAX_INT - 1, 2**54, 2**63, -(2**70)]),
    st.integers(),
)
exact_floats = st.one_of(
    st.floats(),
    st.sampled_from(
        [MAX_FLOAT, -MAX_FLOAT, 1.0000000000000002e18, float("nan"), float("inf"), -0.0]
    ),
)
exact_texts = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["", "\x00", "a\x00b", "a\ud800", "\udfff", "ok\n", "é" * 3]),
    st.sampled_from([MAX_ID_CHARS, MAX_CODE_CHARS, MAX_TEXT_CHARS, MAX_MESSAGE_CHARS]).flatmap(
        lambda n: st.sampled_from(["x" * n, "x" * (n + 1)])
    ),
)
exact_times = st.sampled_from(
    [
        AT,
        AT.replace(tzinfo=None),
        AT.replace(tzinfo=timezone(timedelta(hours=-5))),
        AT.replace(tzinfo=timezone.utc),  # noqa: UP017 (another object than UTC)
        AT.replace(month=1, tzinfo=ZoneInfo("Europe/London")),
        AT.replace(month=7, tzinfo=ZoneInfo("Europe/Berlin")),
    ]
)
optional_texts = st.none() | exact_texts
optional_times = st.none() | exact_times
numbers = st.one_of(exact_ints, exact_floats)
# For each field, values of the Python types it holds (None where it is optional).
EXACT: dict[str, Any] = {
    "agent_id": exact_texts,
    "site_id": exact_texts,
    "equipment_id": optional_texts,
    "ts": exact_times,
    "state": exact_texts | st.sampled_from(["running", "planned_stop", "Fault"]),
    "previous": optional_texts | st.sampled_from(["idle", "setup"]),
    "reason": optional_texts,
    "raw": st.none() | numbers,
    "produced": exact_ints,
    "good": exact_ints,
    "scrap": exact_ints,
    "rework": exact_ints,
    "product": optional_texts,
    "scrap_reason": optional_texts,
    "in_plan": st.booleans(),
    "bucket_start": exact_times,
    "bucket_end": exact_times,
    "shift": optional_texts,
    "shift_start": optional_times,
    "components": st.builds(Components),
    "downtime_by_reason": st.dictionaries(exact_texts, exact_floats | exact_ints, max_size=3),
    "signal": exact_texts,
    "value": st.one_of(st.none(), st.booleans(), numbers, exact_texts),
    "quality": exact_texts | st.sampled_from(["good", "bad"]),
    "code": exact_texts,
    "message": exact_texts,
    "data": st.dictionaries(
        exact_texts, st.none() | st.booleans() | numbers | exact_texts, max_size=3
    ),
}
exact_values = st.one_of(
    st.none(), st.booleans(), exact_ints, exact_floats, exact_texts, exact_times
)
# Values pydantic converts in its lax mode and the check refuses.
foreign_values = st.sampled_from(
    [1, 0, "1", "1.5", "yes", "2026-12-05T06:30:15Z", 1.0, b"x", ["x"], {"a": 1}, ("x",)]
)


def base(cls: type[Any]) -> dict[str, Any]:
    """Valid fields of one event of `cls` (event_id given, so that two builds are equal)."""
    common = {"event_id": uuid7(), "agent_id": "edge-01", "site_id": "plant-01", "ts": AT}
    own: dict[type[Any], dict[str, Any]] = {
        StateEvent: {"state": "fault", "previous": "running", "reason": "jam", "raw": 3},
        CountEvent: {"produced": 2, "good": 1, "scrap": 1, "product": "A", "in_plan": True},
        OeeEvent: {
            "bucket_start": AT - timedelta(minutes=1),
            "bucket_end": AT,
            "shift": "early",
            "shift_start": AT - timedelta(hours=1),
            "components": Components(planned_busy_s=60.0, produced=3),
            "downtime_by_reason": {"jam": 12.5},
        },
        SampleEvent: {"signal": "speed", "value": 1.5, "quality": "good"},
        AgentEvent: {"code": "status", "message": "agent status", "data": {"n": 1}},
    }
    return {**common, "equipment_id": "press-1", **own[cls]}


ADAPTERS = {cls: TypeAdapter(cls) for cls in EVENT_CLASSES}


def outcomes(cls: type[Any], fields: dict[str, Any]) -> tuple[Any, Any]:
    """(the checked event or FieldValueError, pydantic's event or ValidationError)."""
    try:
        checked: Any = cls(**fields)
    except FieldValueError as exc:
        checked = exc
    try:
        validated: Any = ADAPTERS[cls].validate_python(fields)
    except ValidationError as exc:
        validated = exc
    return checked, validated


def agree(cls: type[Any], fields: dict[str, Any], *, both_ways: bool) -> None:
    checked, validated = outcomes(cls, fields)
    if not isinstance(checked, Exception):
        assert not isinstance(validated, Exception), (fields, validated)
        assert checked == validated
        for f in dataclasses.fields(cls):  # the same values, and of the same types
            assert type(getattr(checked, f.name)) is type(getattr(validated, f.name)), f.name
    elif both_ways:
        assert isinstance(validated, Exception), (fields, checked, validated)
    if isinstance(validated, Exception):
        assert isinstance(checked, FieldValueError)


def field_names(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("event_id", "kind")]


@settings(max_examples=1500, deadline=None)
@given(data=st.data(), cls=st.sampled_from(EVENT_CLASSES))
def test_exact_values_are_taken_or_refused_alike(data: st.DataObject, cls: type[Any]) -> None:
    fields = base(cls)
    for name in data.draw(st.lists(st.sampled_from(field_names(cls)), min_size=1, max_size=2)):
        fields[name] = data.draw(EXACT[name], label=name)
    agree(cls, fields, both_ways=True)


@settings(max_examples=500, deadline=None)
@given(data=st.data(), cls=st.sampled_from(EVENT_CLASSES))
def test_what_pydantic_refuses_the_check_refuses(data: st.DataObject, cls: type[Any]) -> None:
    fields = base(cls)
    name = data.draw(st.sampled_from(field_names(cls)))
    fields[name] = data.draw(foreign_values | exact_values, label=name)
    agree(cls, fields, both_ways=False)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(COMPONENT_FIELDS),
    value=st.one_of(exact_ints, exact_floats, st.booleans(), st.none()),
)
def test_components_and_their_event_agree(name: str, value: Any) -> None:
    checked, validated = outcomes(OeeEvent, {**base(OeeEvent), "components": {name: value}})
    assert isinstance(checked, FieldValueError)  # a dict is not Components: no coercion
    try:
        components: Any = Components(**{name: value})
    except FieldValueError:
        components = None
    if components is not None:
        assert not isinstance(validated, Exception)
        assert validated.components == components
        kind = int if name in INTEGER_FIELDS else float
        assert type(getattr(components, name)) is kind
        agree(OeeEvent, {**base(OeeEvent), "components": components}, both_ways=True)
    elif type(value) is int or (type(value) is float and name not in INTEGER_FIELDS):
        assert isinstance(validated, ValidationError)  # of the field's type: refused alike


@pytest.mark.parametrize(
    ("cls", "update", "reason"),
    [
        (CountEvent, {"produced": MAX_INT + 1}, "CountEvent.produced: "),
        (CountEvent, {"ts": AT.replace(tzinfo=None)}, "CountEvent.ts: a time without a UTC"),
        (StateEvent, {"reason": "a\x00"}, "StateEvent.reason: text holds a NUL"),
        (StateEvent, {"state": "broken"}, "StateEvent.state: 'broken' is not one of"),
        (SampleEvent, {"signal": "s" * 65}, "SampleEvent.signal: text longer than 64"),
        (OeeEvent, {"downtime_by_reason": {"jam": float("inf")}}, "not a finite number"),
        (AgentEvent, {"agent_id": ""}, "AgentEvent.agent_id: text shorter than 1"),
        (AgentEvent, {"event_id": "x"}, "AgentEvent.event_id: text does not match"),
    ],
)
def test_a_refusal_names_the_field_and_the_reason(
    cls: type[Any], update: dict[str, Any], reason: str
) -> None:
    with pytest.raises(FieldValueError) as refused:
        cls(**{**base(cls), **update})
    assert reason in str(refused.value)
    assert isinstance(refused.value, ValueError)  # the agent's loops catch ValueError


def test_a_time_is_kept_in_utc_as_pydantic_keeps_it() -> None:
    berlin = AT.replace(tzinfo=ZoneInfo("Europe/Berlin"))
    event = StateEvent(agent_id="a", site_id="s", ts=berlin, state="idle")
    assert event.ts == berlin and event.ts.utcoffset() == timedelta(0)
    assert event == ADAPTERS[StateEvent].validate_python(
        {"event_id": event.event_id, "agent_id": "a", "site_id": "s", "ts": berlin, "state": "idle"}
    )
