"""The event model shared by the edge and the cloud: typed events with a `kind`.

A batch of events travels sealed under the key (agent_id, epoch, seq); the events
themselves carry their own ids (UUIDv7) so the cloud can also deduplicate per event.

Every field is bounded (oee.bounds): the agent builds its events through these models and
ingest validates batches with `load_events`, so an event the cloud could not store or serve
is refused where it is made, not where it is stored.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)

from oee.bounds import (
    MAX_CODE_CHARS,
    MAX_ID_CHARS,
    MAX_INT,
    MAX_MESSAGE_CHARS,
    MAX_TEXT_CHARS,
    BoundedFloat,
    BoundedInt,
    Text,
    check_data,
)
from oee.components import Components

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


def _utc(value: datetime) -> datetime:
    # A time already in UTC (what agents send; from JSON its tzinfo is pydantic's own UTC) is
    # kept as it is: the offset check costs a third of astimezone, on every event ingest reads.
    return value if value.utcoffset() == _ZERO else value.astimezone(UTC)


_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
Id = Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]
PlcText = Annotated[Text, Field(max_length=MAX_TEXT_CHARS)]


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=uuid7, pattern=_UUID)
    agent_id: Id
    site_id: Id
    equipment_id: Id | None = None
    ts: AwareDatetime

    @field_validator("ts", mode="after")
    @classmethod
    def _ts_utc(cls, value: datetime) -> datetime:
        return value if value.utcoffset() == _ZERO else value.astimezone(UTC)


class StateEvent(_EventBase):
    """The equipment entered `state` at `ts` (with the downtime reason, if one is known)."""

    kind: Literal["state"] = "state"
    state: State
    previous: State | None = None
    reason: PlcText | None = None
    raw: BoundedFloat | BoundedInt | None = None


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


_COUNT_GIVEN = frozenset(
    {"agent_id", "site_id", "equipment_id", "ts", "produced", "good", "scrap", "rework"}
    | {"product", "scrap_reason", "in_plan"}
)
_set_field = object.__setattr__


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
    """`CountEvent(...)` with these fields, the same event, without pydantic's validation
    when every value already is what validation would keep unchanged: of its field's exact
    type, within its bounds, `ts` aware with a zero UTC offset. The engine makes one per
    counter increment, and validation was half of the cost of making it. Any other value
    goes through the model, which validates (or refuses) it exactly as before."""
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
        return CountEvent(
            agent_id=agent_id,
            site_id=site_id,
            equipment_id=equipment_id,
            ts=ts,
            produced=produced,
            good=good,
            scrap=scrap,
            rework=rework,
            product=product,
            scrap_reason=scrap_reason,
            in_plan=in_plan,
        )
    event = CountEvent.__new__(CountEvent)
    _set_field(
        event,
        "__dict__",
        {
            "event_id": uuid7(),
            "agent_id": agent_id,
            "site_id": site_id,
            "equipment_id": equipment_id,
            "ts": ts,
            "kind": "count",
            "produced": produced,
            "good": good,
            "scrap": scrap,
            "rework": rework,
            "product": product,
            "scrap_reason": scrap_reason,
            "in_plan": in_plan,
        },
    )
    _set_field(event, "__pydantic_fields_set__", set(_COUNT_GIVEN))
    _set_field(event, "__pydantic_extra__", None)
    _set_field(event, "__pydantic_private__", None)
    return event


class OeeEvent(_EventBase):
    """A closed bucket [start, end) of one equipment with additive components only."""

    kind: Literal["oee"] = "oee"
    bucket_start: AwareDatetime
    bucket_end: AwareDatetime
    shift: PlcText | None = None
    shift_start: AwareDatetime | None = None
    components: Components
    downtime_by_reason: dict[PlcText, BoundedFloat] = Field(default_factory=dict)

    @field_validator("bucket_start", "bucket_end", "shift_start", mode="after")
    @classmethod
    def _bounds_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _utc(value)


class SampleEvent(_EventBase):
    """A raw signal value as read from the PLC (optional, may be shed under disk pressure)."""

    kind: Literal["sample"] = "sample"
    signal: Annotated[Text, Field(max_length=MAX_CODE_CHARS)]
    value: BoundedFloat | BoundedInt | PlcText | bool | None
    quality: Literal["good", "bad"] = "good"


class AgentEvent(_EventBase):
    """Agent health and bookkeeping: counter resets, quarantined readings, loss records, flags."""

    kind: Literal["agent"] = "agent"
    code: Annotated[Text, Field(min_length=1, max_length=MAX_CODE_CHARS)]
    message: Annotated[Text, Field(max_length=MAX_MESSAGE_CHARS)]
    data: Annotated[dict[str, Any], AfterValidator(check_data)] = Field(default_factory=dict)


Event = Annotated[
    StateEvent | CountEvent | OeeEvent | SampleEvent | AgentEvent,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


# Each event class's own serializer: the one the list's tagged union picks by `kind`.
_SERIALIZERS = {
    cls: cls.__pydantic_serializer__
    for cls in (StateEvent, CountEvent, OeeEvent, SampleEvent, AgentEvent)
}


def dump_events(events: Sequence[Event]) -> bytes:
    """Serialize events to compact JSON: the plaintext of a batch, and what ingest stores.

    Each event by its own class's serializer, joined into the array: the same bytes as
    `EVENT_LIST_ADAPTER.dump_json(events)` in about 60 % of its CPU (the list's serializer
    first looks each item's class up in the union by its `kind`: 2.0 against 1.2 us an
    event). A list holding anything but these classes goes through the adapter.
    """
    try:
        parts = [_SERIALIZERS[type(e)].to_json(e) for e in events]
    except KeyError:
        return EVENT_LIST_ADAPTER.dump_json(list(events))
    return b"[" + b",".join(parts) + b"]"


def load_events(data: bytes) -> list[Event]:
    """Parse and validate a batch's plaintext; raises pydantic.ValidationError."""
    return EVENT_LIST_ADAPTER.validate_json(data)
