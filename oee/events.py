"""The event model shared by the edge and the cloud: typed events with a `kind`.

A batch of events travels sealed under the key (agent_id, epoch, seq); the events
themselves carry their own ids (UUIDv7) so the cloud can also deduplicate per event.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from oee.components import Components

STATES: tuple[str, ...] = ("running", "idle", "fault", "setup", "planned_stop", "unknown")
State = Literal["running", "idle", "fault", "setup", "planned_stop", "unknown"]


def uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits; sorts by time."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=uuid7)
    agent_id: str
    site_id: str
    equipment_id: str | None = None
    ts: AwareDatetime

    @field_validator("ts", mode="after")
    @classmethod
    def _ts_utc(cls, value: datetime) -> datetime:
        return _utc(value)


class StateEvent(_EventBase):
    """The equipment entered `state` at `ts` (with the downtime reason, if one is known)."""

    kind: Literal["state"] = "state"
    state: State
    previous: State | None = None
    reason: str | None = None
    raw: float | int | None = None


class CountEvent(_EventBase):
    """Part-count increments observed at `ts`, credited to the active bucket and product."""

    kind: Literal["count"] = "count"
    produced: int = 0
    good: int = 0
    scrap: int = 0
    rework: int = 0
    product: str | None = None
    in_plan: bool = True


class OeeEvent(_EventBase):
    """A closed bucket [start, end) of one equipment with additive components only."""

    kind: Literal["oee"] = "oee"
    bucket_start: AwareDatetime
    bucket_end: AwareDatetime
    shift: str | None = None
    shift_start: AwareDatetime | None = None
    components: Components
    downtime_by_reason: dict[str, float] = Field(default_factory=dict)

    @field_validator("bucket_start", "bucket_end", "shift_start", mode="after")
    @classmethod
    def _bounds_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _utc(value)


class SampleEvent(_EventBase):
    """A raw signal value as read from the PLC (optional, may be shed under disk pressure)."""

    kind: Literal["sample"] = "sample"
    signal: str
    value: float | int | str | bool | None
    quality: Literal["good", "bad"] = "good"


class AgentEvent(_EventBase):
    """Agent health and bookkeeping: counter resets, quarantined readings, loss records, flags."""

    kind: Literal["agent"] = "agent"
    code: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


Event = Annotated[
    StateEvent | CountEvent | OeeEvent | SampleEvent | AgentEvent,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


def dump_events(events: list[Event]) -> bytes:
    """Serialize events to compact JSON (the plaintext of a batch)."""
    return EVENT_LIST_ADAPTER.dump_json(events)


def load_events(data: bytes) -> list[Event]:
    """Parse and validate a batch's plaintext; raises pydantic.ValidationError."""
    return EVENT_LIST_ADAPTER.validate_json(data)
