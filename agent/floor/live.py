"""The live numbers the plant-floor outputs serve, read from the running engine.

One table (`METRICS`) names every value an output may publish, with its data type and
engineering unit; both the OPC UA server and the Sparkplug B edge node are built from it, so
an HMI and a SCADA see the same names. `LiveSource.read()` takes one consistent reading of
every equipment (no second computation: the shift sums are the engine's own, ratios come
from `oee.components.ratios`).

The shift values cover the running shift up to the end of its last closed bucket
(`Shift/Through`): exactly the buckets the cloud stores, so `/v1/equipment/{id}/oee` over
[`Shift/Start`, `Shift/Through`) reports the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from oee.components import INTEGER_FIELDS, Components, Ratios, ratios
from oee.engine import PlantEngine
from oee.events import Event, OeeEvent

Value = str | int | float | bool | datetime | None
Kind = Literal["string", "datetime", "boolean", "count", "seconds", "ratio"]

_US = 1_000_000


@dataclass(frozen=True)
class Unit:
    """An engineering unit by its UNECE Rec. 20 common code (what OPC UA's EUInformation
    carries) and its display name."""

    code: str
    display: str
    description: str


UNITS: dict[Kind, Unit] = {
    "count": Unit("H87", "parts", "piece"),
    "seconds": Unit("SEC", "s", "second [unit of time]"),
    "ratio": Unit("C62", "1", "one (a fraction: 0.85 is 85 %)"),
}


@dataclass(frozen=True)
class Metric:
    """One published value of an equipment: its name (folders separated by `/`) and kind."""

    name: str
    kind: Kind
    description: str

    @property
    def unit(self) -> Unit | None:
        return UNITS.get(self.kind)


def _window_metrics(folder: str, what: str) -> list[Metric]:
    return [
        Metric(f"{folder}/Produced", "count", f"parts produced in {what}"),
        Metric(f"{folder}/Good", "count", f"good parts in {what}"),
        Metric(f"{folder}/Scrap", "count", f"scrapped parts in {what}"),
        Metric(f"{folder}/Rework", "count", f"reworked parts in {what}"),
        Metric(f"{folder}/PlannedBusyTime", "seconds", f"planned busy time of {what}"),
        Metric(f"{folder}/ProductionTime", "seconds", f"production time of {what}"),
        Metric(f"{folder}/DowntimeTime", "seconds", f"downtime (fault and idle) of {what}"),
        Metric(f"{folder}/Availability", "ratio", f"availability of {what}; null if undefined"),
        Metric(f"{folder}/Performance", "ratio", f"performance of {what}; null if undefined"),
        Metric(f"{folder}/Quality", "ratio", f"quality of {what}; null if undefined"),
        Metric(f"{folder}/OEE", "ratio", f"OEE of {what}; null if undefined"),
    ]


METRICS: tuple[Metric, ...] = (
    Metric("State", "string", "running, idle, fault, setup, planned_stop or unknown"),
    Metric("State/Since", "datetime", "when the current state began"),
    Metric("Reason", "string", "the reason of the current stop; empty if none"),
    Metric("Product", "string", "the product being made; empty if none"),
    Metric("Link/Connected", "boolean", "whether the PLC link of the equipment is up"),
    Metric("Shift/Name", "string", "the running shift (of the last closed bucket)"),
    Metric("Shift/Start", "datetime", "when the running shift began"),
    Metric("Shift/Through", "datetime", "the shift values cover the shift up to here"),
    *_window_metrics("Shift", "the running shift"),
    Metric("LastBucket/Start", "datetime", "start of the last closed bucket"),
    Metric("LastBucket/End", "datetime", "end of the last closed bucket"),
    *_window_metrics("LastBucket", "the last closed bucket"),
)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
# Values of the agent as a whole (the Sparkplug node, the OPC UA Agent object).
OUTBOX_DEPTH = Metric("Outbox/Depth", "count", "sealed batches not yet acknowledged by the cloud")


def _components(values: Mapping[str, int]) -> Components:
    kept: dict[str, Any] = {k: v if k in INTEGER_FIELDS else v / _US for k, v in values.items()}
    return Components(**kept)


@dataclass(frozen=True)
class EngineReading:
    """What the floor outputs need of one equipment's engine at one instant."""

    state: str
    state_since: datetime | None
    reason: str | None
    product: str | None
    shift: str | None
    shift_start: datetime | None
    shift_totals: Components


def read_engine(plant: PlantEngine) -> dict[str, EngineReading]:
    """The engine's state through its read API (`PlantEngine.snapshots()`); the shift is the
    one of the last closed bucket, with its closed buckets' totals."""
    out: dict[str, EngineReading] = {}
    for eq, snap in plant.snapshots().items():
        shift = snap.closed_shift
        out[eq] = EngineReading(
            state=snap.state,
            state_since=snap.state_since,
            reason=snap.reason,
            product=snap.product,
            shift=None if shift is None else shift.name,
            shift_start=None if shift is None else shift.start,
            shift_totals=Components() if shift is None else shift.closed,
        )
    return out


def _window_values(folder: str, c: Components | None) -> dict[str, Value]:
    r = (
        ratios(c)
        if c is not None
        else Ratios(availability=None, performance=None, quality=None, oee=None)
    )
    return {
        f"{folder}/Produced": None if c is None else c.produced,
        f"{folder}/Good": None if c is None else c.good,
        f"{folder}/Scrap": None if c is None else c.scrap,
        f"{folder}/Rework": None if c is None else c.rework,
        f"{folder}/PlannedBusyTime": None if c is None else c.planned_busy_s,
        f"{folder}/ProductionTime": None if c is None else c.production_s,
        f"{folder}/DowntimeTime": None if c is None else c.downtime_s,
        f"{folder}/Availability": r.availability,
        f"{folder}/Performance": r.performance,
        f"{folder}/Quality": r.quality,
        f"{folder}/OEE": r.oee,
    }


@dataclass(frozen=True)
class EquipmentLive:
    """One equipment's published values (every name of METRICS), read at one instant."""

    equipment: str
    line: str | None
    values: dict[str, Value]


@dataclass
class LiveSource:
    """Reads the live values of every equipment: the engine, the last closed bucket seen go
    by (`observe`), and each PLC link's health (`links()` -> {connection id: connected})."""

    engine: PlantEngine
    lines: Mapping[str, str | None]
    connections: Mapping[str, str | None]
    links: Callable[[], Mapping[str, bool]]
    outbox_depth: Callable[[], int]
    last_bucket: dict[str, OeeEvent] = field(default_factory=dict)

    def observe(self, events: Iterable[Event]) -> None:
        """Keep the last closed bucket of each equipment from the events the engine made."""
        for event in events:
            if isinstance(event, OeeEvent) and event.equipment_id is not None:
                seen = self.last_bucket.get(event.equipment_id)
                if seen is None or event.bucket_end >= seen.bucket_end:
                    self.last_bucket[event.equipment_id] = event

    def read(self) -> dict[str, EquipmentLive]:
        links = self.links()
        out: dict[str, EquipmentLive] = {}
        for eq, reading in read_engine(self.engine).items():
            last = self.last_bucket.get(eq)
            through: datetime | None = None
            if (
                last is not None
                and reading.shift is not None
                and last.shift == reading.shift
                and last.shift_start == reading.shift_start
            ):
                through = last.bucket_end
            conn = self.connections.get(eq)
            values: dict[str, Value] = {
                "State": reading.state,
                "State/Since": reading.state_since,
                "Reason": reading.reason or "",
                "Product": reading.product or "",
                "Link/Connected": None if conn is None else links.get(conn, False),
                "Shift/Name": reading.shift,
                "Shift/Start": reading.shift_start,
                "Shift/Through": through,
                **_window_values("Shift", reading.shift_totals if reading.shift else None),
                "LastBucket/Start": None if last is None else last.bucket_start,
                "LastBucket/End": None if last is None else last.bucket_end,
                **_window_values("LastBucket", None if last is None else last.components),
            }
            out[eq] = EquipmentLive(eq, self.lines.get(eq), values)
        return out
