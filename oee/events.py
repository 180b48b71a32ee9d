"""The event model shared by the edge and the cloud: typed events with a `kind`.

A batch of events travels sealed under the key (agent_id, epoch, seq); the events
themselves carry their own ids (UUIDv7) so the cloud can also deduplicate per event.

The events are frozen dataclasses. Every field is bounded (oee.bounds): the agent's events
check their fields when they are made (oee.checking, FieldValueError), and ingest validates
batches with `load_events` (pydantic, the same bounds), so an event the cloud could not store
or serve is refused where it is made, not where it is stored. The agent builds, dumps and
reads events without importing pydantic.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from common.checks import FORBID, After, Check
from oee.bounds import (
    MAX_CODE_CHARS,
    MAX_ID_CHARS,
    MAX_INT,
    MAX_MESSAGE_CHARS,
    MAX_TEXT_CHARS,
    BoundedFloat,
    BoundedInt,
    Text,
    UtcTime,
    check_data,
)
from oee.checking import FieldValueError, build_unchecked, checked
from oee.components import Components

if TYPE_CHECKING:
    from pydantic import TypeAdapter

STATES: tuple[str, ...] = ("running", "idle", "fault", "setup", "planned_stop", "unknown")
State = Literal["running", "idle", "fault", "setup", "planned_stop", "unknown"]


_COUNTER_MAX = 0xFFF
# The newest (milliseconds, counter) this process handed out, for uuid7 without `now_ms`.
_last = [0, 0]
_last_lock = threading.Lock()
# Random bits for ids come from the OS (os.urandom) a few kilobytes at a time, under the
# lock: one system call per 409 ids instead of one per id.
_POOL_BYTES = 4096
_pool: list[Any] = [b"", 0]  # bytes, next offset


def _forget_pool() -> None:
    _pool[0], _pool[1] = b"", 0  # a forked child must not reuse its parent's random bytes


os.register_at_fork(after_in_child=_forget_pool)
_MS_MASK = (1 << 48) - 1
_RAND_MASK = (1 << 62) - 1
_VERSION_VARIANT = (0x7 << 76) | (0b10 << 62)


def _random_bits() -> int:
    """80 random bits (the caller holds `_last_lock`)."""
    pool, at = _pool
    if at + 10 > len(pool):
        pool, at = os.urandom(_POOL_BYTES), 0
        _pool[0] = pool
    _pool[1] = at + 10
    return int.from_bytes(pool[at : at + 10], "big")


def uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, a 12-bit counter, then random bits;
    sorts by time.

    Without `now_ms`, ids made by one process sort in the order they were made (RFC 9562
    6.2, method 1: the counter counts up within a millisecond, and the time never goes back):
    events of one instant, such as the `unknown` state an engine announces at its start and
    the first state it reads at the same instant, keep their order wherever events are
    ordered by (ts, event_id). With `now_ms` the counter is random.

    The text is formatted here rather than through `uuid.UUID` (the same canonical
    lower-case 8-4-4-4-12 form): an id is made for every event, and the object cost as much
    as the rest of the id.
    """
    with _last_lock:
        rand = _random_bits()
        if now_ms is None:
            ms = max(int(time.time() * 1000), _last[0])
            counter = _last[1] + 1 if ms == _last[0] else 0
            if counter > _COUNTER_MAX:
                ms, counter = ms + 1, 0
            _last[0], _last[1] = ms, counter
        else:
            ms, counter = now_ms, (rand >> 62) & _COUNTER_MAX
    h = "%032x" % ((ms & _MS_MASK) << 80 | _VERSION_VARIANT | counter << 64 | rand & _RAND_MASK)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_ZERO = timedelta(0)

_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
Id = Annotated[Text, Check(min_length=1, max_length=MAX_ID_CHARS)]
PlcText = Annotated[Text, Check(max_length=MAX_TEXT_CHARS)]


@dataclass(frozen=True, slots=True, kw_only=True)
class _EventBase:
    __pydantic_config__ = FORBID

    event_id: Annotated[str, Check(pattern=_UUID)] = field(default_factory=uuid7)
    agent_id: Id
    site_id: Id
    equipment_id: Id | None = None
    ts: UtcTime


@checked
@dataclass(frozen=True, slots=True, kw_only=True)
class StateEvent(_EventBase):
    """The equipment entered `state` at `ts` (with the downtime reason, if one is known)."""

    kind: Literal["state"] = "state"
    state: State
    previous: State | None = None
    reason: PlcText | None = None
    raw: BoundedFloat | BoundedInt | None = None


@checked
@dataclass(frozen=True, slots=True, kw_only=True)
class CountEvent(_EventBase):
    """Part counts observed at `ts`, credited to the active bucket and product.

    The quantities are signed: they are what one counter increment changed in the bucket
    (oee.quantities), e.g. a scrap increment of a total+scrap machine is scrap +n, good -n.
    Summed over any window they equal the buckets' quantities (`in_plan` ones) or their
    `off_plan_produced` (the others).
    """

    kind: Literal["count"] = "count"
    produced: BoundedInt = 0
    good: BoundedInt = 0
    scrap: BoundedInt = 0
    rework: BoundedInt = 0
    product: PlcText | None = None
    # The scrap reason in force when the scrap counted here was observed (equipment with a
    # scrap_reason signal); None: no scrap, or no reason known.
    scrap_reason: PlcText | None = None
    in_plan: bool = True


def _plain_text(value: object, min_chars: int, max_chars: int) -> bool:
    """Whether `value` is a str the Text/Id fields take as it is (no NUL, no lone surrogate)."""
    if type(value) is not str or not min_chars <= len(value) <= max_chars or "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Ids already found plain: an engine's three ids are the same on every event it makes.
_plain_ids: set[str] = set()
_PLAIN_IDS_MAX = 10_000


def _plain_id(value: object) -> bool:
    if type(value) is not str:
        return False
    if value in _plain_ids:
        return True
    if not _plain_text(value, 1, MAX_ID_CHARS):
        return False
    if len(_plain_ids) >= _PLAIN_IDS_MAX:
        _plain_ids.clear()
    _plain_ids.add(value)
    return True


def _plain_int(value: object) -> bool:
    return type(value) is int and -MAX_INT <= value <= MAX_INT


def count_event(
    *,
    agent_id: str,
    site_id: str,
    equipment_id: str,
    ts: datetime,
    produced: int,
    good: int,
    scrap: int,
    rework: int,
    product: str | None,
    scrap_reason: str | None,
    in_plan: bool,
) -> CountEvent:
    """`CountEvent(...)` with these fields, the same event, without the field check when
    every value already is what the check keeps unchanged: of its field's exact type, within
    its bounds, `ts` aware with a zero UTC offset. The engine makes one per counter
    increment, and the check was about half of the cost of making it. Any other value goes
    through the check, which keeps (or refuses, FieldValueError) it as `CountEvent` does."""
    given: dict[str, Any] = {
        "agent_id": agent_id,
        "site_id": site_id,
        "equipment_id": equipment_id,
        "ts": ts,
        "produced": produced,
        "good": good,
        "scrap": scrap,
        "rework": rework,
        "product": product,
        "scrap_reason": scrap_reason,
        "in_plan": in_plan,
    }
    if not (
        type(in_plan) is bool
        and _plain_int(produced)
        and _plain_int(good)
        and _plain_int(scrap)
        and _plain_int(rework)
        and type(ts) is datetime
        and ts.utcoffset() == _ZERO
        and (product is None or _plain_text(product, 0, MAX_TEXT_CHARS))
        and (scrap_reason is None or _plain_text(scrap_reason, 0, MAX_TEXT_CHARS))
        and _plain_id(agent_id)
        and _plain_id(site_id)
        and _plain_id(equipment_id)
    ):
        return CountEvent(**given)
    return build_unchecked(CountEvent, event_id=uuid7(), kind="count", **given)


@checked
@dataclass(frozen=True, slots=True, kw_only=True)
class OeeEvent(_EventBase):
    """A closed bucket [start, end) of one equipment with additive components only."""

    kind: Literal["oee"] = "oee"
    bucket_start: UtcTime
    bucket_end: UtcTime
    shift: PlcText | None = None
    shift_start: UtcTime | None = None
    components: Components
    downtime_by_reason: dict[PlcText, BoundedFloat] = field(default_factory=dict)


@checked
@dataclass(frozen=True, slots=True, kw_only=True)
class SampleEvent(_EventBase):
    """A raw signal value as read from the PLC (optional, may be shed under disk pressure)."""

    kind: Literal["sample"] = "sample"
    signal: Annotated[Text, Check(max_length=MAX_CODE_CHARS)]
    value: BoundedFloat | BoundedInt | PlcText | bool | None
    quality: Literal["good", "bad"] = "good"


@checked
@dataclass(frozen=True, slots=True, kw_only=True)
class AgentEvent(_EventBase):
    """Agent health and bookkeeping: counter resets, quarantined readings, loss records, flags."""

    kind: Literal["agent"] = "agent"
    code: Annotated[Text, Check(min_length=1, max_length=MAX_CODE_CHARS)]
    message: Annotated[Text, Check(max_length=MAX_MESSAGE_CHARS)]
    data: Annotated[dict[str, Any], After(check_data)] = field(default_factory=dict)


EVENT_CLASSES: tuple[type[Any], ...] = (StateEvent, CountEvent, OeeEvent, SampleEvent, AgentEvent)
Event = Annotated[
    StateEvent | CountEvent | OeeEvent | SampleEvent | AgentEvent,
    Check(discriminator="kind"),
]


# --- pydantic, only where untrusted batches are validated (ingest) --------------------------

_adapters_lock = threading.Lock()
_adapters: dict[str, Any] = {}


def _pydantic() -> dict[str, Any]:
    """The TypeAdapters of events, built at their first use (importing pydantic then)."""
    if not _adapters:
        with _adapters_lock:
            if not _adapters:
                from pydantic import TypeAdapter

                made: dict[str, Any] = {
                    "EVENT_ADAPTER": TypeAdapter(Event),
                    "EVENT_LIST_ADAPTER": TypeAdapter(list[Event]),
                    # Each event class's own serializer: the one the list's tagged union
                    # picks by `kind`.
                    "serializers": {cls: TypeAdapter(cls).serializer for cls in EVENT_CLASSES},
                }
                _adapters.update(made)
    return _adapters


if TYPE_CHECKING:
    EVENT_ADAPTER: TypeAdapter[Event]
    EVENT_LIST_ADAPTER: TypeAdapter[list[Event]]


def __getattr__(name: str) -> Any:
    # EVENT_ADAPTER and EVENT_LIST_ADAPTER are built (and pydantic imported) when first read.
    if name in ("EVENT_ADAPTER", "EVENT_LIST_ADAPTER"):
        return _pydantic()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_events(data: bytes) -> list[Event]:
    """Parse and validate a batch's plaintext; raises pydantic.ValidationError."""
    events: list[Event] = _pydantic()["EVENT_LIST_ADAPTER"].validate_json(data)
    return events


# --- JSON without pydantic ------------------------------------------------------------------

_string = json.encoder.encode_basestring


def _float(value: float) -> str:
    # pydantic's float text: Python's shortest repr, except that exponents below -4 are
    # written without a leading zero or sign padding (1e-7, not 1e-07), and that numbers
    # from 1e-5 to 1e-4 are written as decimals (0.00001).
    text = repr(value)
    if "e-" not in text:
        return text
    mantissa, exponent = text.split("e-")
    if exponent == "05":
        sign = "-" if mantissa.startswith("-") else ""
        return f"{sign}0.0000{mantissa.lstrip('-').replace('.', '')}"
    return f"{mantissa}e-{int(exponent)}"


def _time(value: datetime) -> str:
    text = value.isoformat()
    if text.endswith("+00:00") and value.utcoffset() == _ZERO:
        text = text[:-6] + "Z"
    return f'"{text}"'


def _mapping(value: dict[Any, Any]) -> str:
    return "{" + ",".join(f"{_string(k)}:{_json(v)}" for k, v in value.items()) + "}"


def _sequence(value: list[Any] | tuple[Any, ...]) -> str:
    return "[" + ",".join(map(_json, value)) + "]"


def _components(value: Components) -> str:
    return _mapping(value.as_dict())


_WRITERS: dict[type, Callable[[Any], str]] = {
    str: _string,
    int: int.__repr__,
    float: _float,
    bool: lambda v: "true" if v else "false",
    type(None): lambda v: "null",
    datetime: _time,
    dict: _mapping,
    list: _sequence,
    tuple: _sequence,
    Components: _components,
}


def _json(value: Any) -> str:
    writer = _WRITERS.get(type(value))
    if writer is None:
        raise TypeError(f"an event holds a {type(value).__name__}, which is not JSON")
    return writer(value)


def _event_writer(cls: type[Any]) -> Callable[[Any], str]:
    names = [(f'"{f.name}":', f.name) for f in fields(cls)]

    def write(event: Any) -> str:
        return "{" + ",".join([key + _json(getattr(event, name)) for key, name in names]) + "}"

    return write


_EVENT_WRITERS = {cls: _event_writer(cls) for cls in EVENT_CLASSES}


def dump_events(events: Sequence[Event]) -> bytes:
    """Serialize events to compact JSON: the plaintext of a batch, and what ingest stores.

    The bytes are those of pydantic's `EVENT_LIST_ADAPTER.dump_json(events)`. A process that
    validates events with pydantic (ingest) dumps them with each class's pydantic serializer,
    joined into the array (about 60 % of the list adapter's CPU, which first looks each item's
    class up in the union by its `kind`); the agent writes the same JSON in plain Python,
    without importing pydantic. A list holding anything but these classes is refused
    (TypeError), as by the adapter (a serialization error).
    """
    if not _adapters:
        return dump_events_plain(events)
    serializers = _adapters["serializers"]
    try:
        parts = [serializers[type(e)].to_json(e) for e in events]
    except KeyError:
        return bytes(_adapters["EVENT_LIST_ADAPTER"].dump_json(list(events)))
    return b"[" + b",".join(parts) + b"]"


def dump_events_plain(events: Sequence[Event]) -> bytes:
    """`dump_events` in plain Python, what the agent runs: the same bytes (TypeError for a
    list holding anything but events)."""
    try:
        text = ",".join([_EVENT_WRITERS[type(e)](e) for e in events])
    except KeyError:
        raise TypeError("dump_events takes events only") from None
    return f"[{text}]".encode()


__all__ = [
    "EVENT_CLASSES",
    "STATES",
    "AgentEvent",
    "CountEvent",
    "Event",
    "FieldValueError",
    "OeeEvent",
    "SampleEvent",
    "State",
    "StateEvent",
    "count_event",
    "dump_events",
    "dump_events_plain",
    "load_events",
    "uuid7",
]
