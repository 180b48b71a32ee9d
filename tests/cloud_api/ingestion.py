"""Feeding the real ingest path in tests: events of an enrolled agent, sealed with
sync.envelope.seal and handed to BatchWriter.process (the MQTT hop is covered end to end)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from psycopg_pool import ConnectionPool

from cloud_api.ingest.worker import BatchWriter
from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.components import Components
from oee.config import EquipmentSpec, ShiftSpec
from oee.engine import PlantEngine
from oee.events import Event, OeeEvent, dump_events
from sync.envelope import EnvelopeHeader, seal
from sync.keys import AgentKeys, CloudKeyring
from sync.uplink import batch_topic
from tests.conftest import enroll, make_agent_keys


@dataclass
class Agent:
    """An enrolled agent that seals batches and sends them through BatchWriter.process."""

    agent_id: str
    site_id: str
    keys: AgentKeys
    store: BatchWriter
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    seq: int = 0

    def send(self, events: Sequence[Event], *, seq: int | None = None) -> str:
        """Seal and ingest one batch; returns the outcome status ("stored", ...)."""
        raw = self.sealed(events, seq=seq)
        outcome = self.store.process(self.topic, raw)
        assert outcome.status != "rejected", outcome.reason
        return outcome.status

    @property
    def topic(self) -> str:
        return batch_topic(self.store.topic_prefix, self.site_id, self.agent_id)

    def sealed(
        self, events: Sequence[Event], *, seq: int | None = None, created: datetime | None = None
    ) -> bytes:
        """The envelope of one batch (the next seq unless given; created now unless given)."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        made = {}
        if created is not None:  # as the envelope writes its own: UTC, milliseconds, "Z"
            made["created"] = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = EnvelopeHeader(
            agent_id=self.agent_id,
            site_id=self.site_id,
            epoch=self.epoch,
            seq=seq,
            count=len(events),
            signing_key_id=self.keys.signing_key_id,
            cloud_key_id=self.keys.cloud_public.key_id,
            suite=self.keys.cloud_public.suite,
            **made,
        )
        return seal(
            dump_events(list(events)), header, self.keys.signing_key, self.keys.cloud_public
        )

    def bucket(
        self,
        equipment: str,
        start: datetime,
        *,
        seconds: float = 60.0,
        shift: str | None = None,
        shift_start: datetime | None = None,
        reasons: dict[str, float] | None = None,
        **components: float,
    ) -> OeeEvent:
        """An OEE bucket [start, start + seconds) with the given additive components."""
        end = start + timedelta(seconds=seconds)
        return OeeEvent(
            agent_id=self.agent_id,
            site_id=self.site_id,
            equipment_id=equipment,
            ts=end,
            bucket_start=start,
            bucket_end=end,
            shift=shift,
            shift_start=shift_start,
            components=Components(**components),
            downtime_by_reason=reasons or {},
        )

    def engine_events(
        self,
        specs: Sequence[EquipmentSpec],
        samples: Sequence[Sample],
        start: datetime,
        end: datetime,
    ) -> list[Event]:
        """What the live engine ships for `samples` over [start, end) (state, count, agent and
        1-minute oee events), with one shift "early" around the clock."""
        calendar = ShiftCalendar(
            [validated(ShiftSpec, name="early", start="00:00", end="00:00")], "UTC"
        )  # type: ignore[arg-type]
        plant = PlantEngine(
            list(specs), calendar, agent_id=self.agent_id, site_id=self.site_id, bucket_seconds=60
        )
        events = plant.start(start)
        for sample in samples:
            events += plant.feed(sample)
        return events + plant.finish(end)


def press_spec(equipment: str) -> EquipmentSpec:
    """A press as the engine sees it: state 0 idle, 1 running, 2 fault, 3 setup; reason 1 jam,
    2 no material; product 1 A (1 s), 2 B (2 s); total, scrap and rework counters."""
    return validate(EquipmentSpec,
        {"id": equipment, "ideal_cycle_time": 1.0,
         "state_map": {0: "idle", 1: "running", 2: "fault", 3: "setup"},
         "reason_map": {1: "jam", 2: "no material"}, "product_map": {1: "A", 2: "B"},
         "products": {"A": {"ideal_cycle_time": 1.0}, "B": {"ideal_cycle_time": 2.0}},
         "counters": {"total_count": {}, "scrap_count": {}, "rework_count": {}}}
    )  # fmt: skip


def enrolled_agent(
    pg_url: str,
    pool: ConnectionPool,
    ring: CloudKeyring,
    directory: Path,
    *,
    agent_id: str,
    site_id: str,
    topic_prefix: str = "test/",
) -> Agent:
    """Create keys for an agent, enroll it at `site_id` and give it a BatchWriter."""
    public_line = make_agent_keys(directory, ring)
    enroll(pg_url, agent_id, site_id, public_line)
    store = BatchWriter(pool, ring, topic_prefix=topic_prefix)
    return Agent(agent_id, site_id, AgentKeys.load(directory), store)
