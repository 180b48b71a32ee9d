"""The running agent: connectors -> OEE engine -> sealed batches in the outbox -> uplink.

Every flush commits the events produced since the last one together with the engine
checkpoint that produced them, in one outbox transaction: a crash at any point either keeps
both or neither, so no part count is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from agent.config import AgentConfig, SignalConfig
from agent.engine_store import EngineStore
from agent.outbox_writer import OutboxWriter
from agent.raw_samples import RawSamplePublisher
from buffer.outbox import Outbox
from common.checks import jsonable
from connectors.connector import Hub
from connectors.registry import build_hub
from connectors.sample import Sample
from oee.bounds import clean_text
from oee.engine import PlantEngine, to_us
from oee.events import AgentEvent, Event, dump_events
from oee.quantities import COUNTER_SIGNALS
from sync.envelope import EnvelopeHeader, RejectionBody, envelope_digest, seal
from sync.keys import AgentKeys
from sync.uplink import BrokerSettings, Uplink
from sync.version import VERSION

if TYPE_CHECKING:
    from agent.floor.outputs import PlantFloor

log = structlog.get_logger("agent")

AGENT_VERSION = VERSION

Clock = Callable[[], datetime]

# How long a graceful stop waits for cancelled tasks (pipeline stages, then anything left)
# before going on without them.
STAGE_STOP_TIMEOUT_S = 5.0


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Cancel `tasks` and wait for them at most STAGE_STOP_TIMEOUT_S; returns those that have
    not ended, by name. Failures of the others are marked retrieved (a stage's was raised
    already)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    done, stuck = await asyncio.wait(tasks, timeout=STAGE_STOP_TIMEOUT_S)
    for task in done:
        if not task.cancelled():
            task.exception()
    return sorted(stuck, key=lambda t: t.get_name())


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StatusCadence:
    """When the agent's status event is due: at the first flush, then at the first flush of
    each `interval` slot of the wall clock, aligned like the OEE buckets (to the epoch, so to
    UTC minutes and hours). With the default 60 s the status goes in the flush that closes
    the minute's buckets and shares its commit: an idle line commits once a minute, not twice
    (README "Storage"). A wall clock that stands still or jumps still gives one at least
    every two intervals of monotonic time."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: tuple[int, float] | None = None  # (slot, monotonic time) of the last one

    def due(self, now: datetime, mono: float) -> bool:
        """True (and noted as sent) when a status goes with the flush at `now`."""
        slot = int(now.timestamp() // self.interval)
        last = self._last
        if last is None or slot != last[0] or mono - last[1] >= 2 * self.interval:
            self._last = (slot, mono)
            return True
        return False


class AgentRuntime:
    """Wires the pipeline for one configuration; `await runtime.run(stop)`."""

    def __init__(self, config: AgentConfig, keys: AgentKeys, *, clock: Clock = _utcnow) -> None:
        self.config = config
        self.keys = keys
        self.clock = clock
        self.samples: asyncio.Queue[Sample] = asyncio.Queue(maxsize=100_000)
        self.outbox = Outbox(
            config.outbox_path,
            max_bytes=config.outbox.max_bytes,
            min_free_bytes=config.outbox.min_free_bytes,
            exclusive=True,
        )
        self.state_store = EngineStore(
            self.outbox,
            heartbeat_s=config.outbox.heartbeat_interval,
            snapshot_s=config.outbox.snapshot_interval,
        )
        # The configured suite decides which of the cloud's published keys seals batches.
        self.cloud_key = keys.cloud_key_for(config.uplink.suite)
        self.writer = OutboxWriter(
            self.outbox,
            self._seal_batch,
            agent_id=config.agent.id,
            site_id=config.agent.site,
            batch_max_events=config.uplink.batch_max_events,
            when_full=config.outbox.when_full,
        )
        raw = config.raw_samples
        self.raw_samples = (
            RawSamplePublisher(
                agent_id=config.agent.id,
                site_id=config.agent.site,
                deadband=raw.deadband,
                max_interval=raw.max_interval,
                signals=raw.signals,
            )
            if raw.enabled
            else None
        )
        self.engine = PlantEngine(
            config.oee_specs(),
            config.calendar(),
            agent_id=config.agent.id,
            site_id=config.agent.site,
            bucket_seconds=config.agent.bucket_seconds,
        )
        self.pending: list[Event] = []
        # Counters whose width follows the data type their PLC declares (no `type:`/`width:`),
        # and the declared type last applied to each.
        self._width_from_source: dict[tuple[str, str], SignalConfig] = {
            (eq.id, name): sig
            for eq in config.equipment
            for name, sig in eq.signals.items()
            if name in COUNTER_SIGNALS and sig.width_from_source
        }
        self._source_types: dict[tuple[str, str], str] = {}
        # Read by the service's watchdog and the local metrics (agent/service.py, health.py).
        self.tasks: list[asyncio.Task[None]] = []
        self.last_flush: float | None = None
        self.samples_total = 0
        self.samples_ignored = 0
        self.hubs: list[Hub] = [build_hub(conn, config.equipment) for conn in config.connections]
        mqtt = config.mqtt
        self.uplink = Uplink(
            self.outbox,
            BrokerSettings(
                **mqtt.endpoints(),
                username=mqtt.username,
                password=mqtt.password,
                tls=mqtt.tls,
                ca_file=str(mqtt.ca_file) if mqtt.ca_file else None,
                keepalive=mqtt.keepalive,
            ),
            site=config.agent.site,
            agent=config.agent.id,
            ack_keys=keys.ack_verify_keys,
            topic_prefix=mqtt.topic_prefix,
            ack_timeout=config.uplink.ack_timeout,
            max_in_flight=config.uplink.max_in_flight,
            on_rejected=self.record_rejection,
        )
        self.log = log.bind(agent=config.agent.id, site=config.agent.site)
        # Plant-floor outputs (OPC UA server, Sparkplug B): read-only, off unless configured,
        # and imported only then (the OPC UA server's library alone is the size of the agent).
        self.floor: PlantFloor | None = None
        if config.plant_mqtt is not None or config.opcua_server is not None:
            from agent.floor.outputs import PlantFloor

            self.floor = PlantFloor(
                engine=self.engine,
                agent=config.agent.id,
                site=config.agent.site,
                lines={eq.id: eq.line for eq in config.equipment},
                connections={eq.id: eq.connection for eq in config.equipment},
                connection_ids=[c.id for c in config.connections],
                links=lambda: {hub.config.id: hub.connected for hub in self.hubs},
                outbox_depth=lambda: self.outbox.stats().depth,
                keys_dir=config.keys_dir,
                state_dir=config.agent.state_dir,
                plant_mqtt=config.plant_mqtt,
                opcua_server=config.opcua_server,
            )

    # -- start-up -------------------------------------------------------------------------

    def _resume(self) -> None:
        now = self.clock()
        report = self.outbox.open_report
        if report.moved_aside is not None:
            self.log.error(
                "outbox was corrupt; moved aside, started a new epoch",
                moved_to=str(report.moved_aside),
                problem=report.problem,
            )
            self.pending.append(
                self._agent_event(
                    now,
                    "outbox_replaced",
                    "the outbox file was corrupt and was replaced; unsent batches in it are in "
                    f"{report.moved_aside.name} on the edge box",
                    {"moved_to": str(report.moved_aside), "problem": report.problem},
                )
            )
        resumed = self.state_store.resume(self.engine, now)
        if resumed is not None:
            events, problems = resumed
            for eq, error in problems.items():
                problem = clean_text(error)  # an exception's text may quote the bad entry
                # Starting afresh re-baselines the counters: parts made since the last
                # checkpoint are not counted, so this is reported as a loss.
                self.log.error(
                    "checkpoint not usable, equipment starts afresh", equipment=eq, problem=problem
                )
                self.pending.append(
                    self._agent_event(
                        now,
                        "checkpoint_discarded",
                        f"{eq}: the saved engine state could not be restored ({problem}); "
                        "counting restarts from the next reading",
                        {"equipment": eq, "problem": problem, "loss": True},
                    )
                )
            self.pending.extend(events)
            self.log.info("resumed from checkpoint")
        for engine in self.engine.engines.values():
            self.pending.extend(engine.start(now, announce=True))
        self.pending.append(self._agent_event(now, "agent_started", "agent started", {}))
        self.pending.append(self.config_event(now))

    def config_event(self, now: datetime) -> Event:
        """The configuration as the cloud's registry reads it (AgentEvent code "config")."""
        cfg = self.config
        equipment = []
        for eq in cfg.equipment:
            reason = eq.signals.get("reason")
            equipment.append(
                {
                    "id": eq.id,
                    "line": eq.line,
                    "connection": eq.connection,
                    "ideal_cycle_time_s": eq.ideal_cycle_time,
                    "micro_stop_threshold_s": eq.micro_stop_threshold,
                    "micro_stops": eq.micro_stops,
                    "reasons": dict(reason.map or {}) if reason else {},
                    "states": dict(eq.signals["state"].map or {}),
                    "products": {k: v.ideal_cycle_time for k, v in eq.products.items()},
                    "targets": dict(eq.targets),
                }
            )
        return self._agent_event(
            now,
            "config",
            "agent configuration",
            {
                "timezone": cfg.agent.timezone,
                "bucket_seconds": cfg.agent.bucket_seconds,
                "shifts": [jsonable(s) for s in cfg.shifts],
                "equipment": equipment,
                # Site and line targets (equipment targets are under each equipment).
                "targets": jsonable(cfg.targets),
            },
        )

    def _agent_event(self, at: datetime, code: str, message: str, data: dict[str, Any]) -> Event:
        return AgentEvent(
            agent_id=self.config.agent.id,
            site_id=self.config.agent.site,
            ts=at,
            code=code,
            message=message,
            data=data,
        )

    def record_rejection(self, rejection: RejectionBody, events: int) -> bool:
        """Commit the loss record of a batch the cloud refused for good (signed, it travels in
        a later batch); True once it is in the outbox, so the uplink may remove the batch. A
        crash in between sends the batch again and records the loss again: the cloud keys
        losses by (epoch, seq)."""
        now = self.clock()
        event = self._agent_event(
            now,
            "batch_rejected",
            f"the cloud refused batch {rejection.seq} of epoch {rejection.epoch} for good "
            f"({rejection.reason}): its {events} event(s) are lost",
            {
                "epoch": rejection.epoch,
                "seqs": [rejection.seq],
                "events": events,
                "reason": rejection.reason,
                "detail": rejection.detail,
                "loss": True,
            },
        )
        result = self.writer.write([event], None, now)
        # The outbox is full: fill alarms held with it go out with the next flush; the batch
        # stays until a later rejection finds room for its loss record.
        self.pending.extend(e for e in result.held if e is not event)
        return not result.held

    # -- the pipeline ---------------------------------------------------------------------

    async def _emit(self, sample: Sample) -> None:
        await self.samples.put(sample)

    def _seal_batch(self, events: list[Event]) -> Callable[[str, int], tuple[bytes, str]]:
        plaintext = dump_events(events)
        keys = self.keys
        cloud_key = self.cloud_key

        def sealer(epoch: str, seq: int) -> tuple[bytes, str]:
            header = EnvelopeHeader(
                agent_id=self.config.agent.id,
                site_id=self.config.agent.site,
                epoch=epoch,
                seq=seq,
                count=len(events),
                signing_key_id=keys.signing_key_id,
                cloud_key_id=cloud_key.key_id,
                suite=cloud_key.suite,
                trace_id=secrets.token_hex(16),
            )
            raw = seal(plaintext, header, keys.signing_key, cloud_key)
            return raw, envelope_digest(raw)

        return sealer

    def flush(self, now: datetime | None = None) -> int:
        """Close due buckets and commit pending events with the checkpoint; returns batches."""
        self.last_flush = time.monotonic()
        if now is None:
            now = self.clock()
        self.pending.extend(self.engine.tick(now))
        if self.floor is not None:
            self.floor.observe(self.pending)  # the last closed bucket, for the floor outputs
        state = self.state_store.prepare(
            self.engine.checkpoint(), to_us(now), riding=bool(self.pending)
        )
        # When the outbox is full the events are held (the engine's advance stays in memory,
        # the state on disk stays consistent with what is stored) or raw samples shed.
        result = self.writer.write(self.pending, state, now)
        self.pending = result.held
        if result.committed and state is not None:
            self.state_store.committed(state)
        if result.seqs:
            self.uplink.notify()
        return len(result.seqs)

    def _feed(self, sample: Sample) -> None:
        if sample.source_type is not None and self._width_from_source:
            self._follow_source_type(sample, sample.source_type)
        self.pending.extend(self.engine.feed(sample))

    def _follow_source_type(self, sample: Sample, declared: str) -> None:
        """Count a counter at the width of the data type its PLC declares (before its value)."""
        key = (sample.equipment_id, sample.signal)
        signal = self._width_from_source.get(key)
        if signal is None or self._source_types.get(key) == declared:
            return
        self._source_types[key] = declared
        counter = signal.counter_spec(declared)
        self.engine.set_counter(sample.equipment_id, sample.signal, counter)
        self.log.info(
            "counter width from the PLC",
            equipment=sample.equipment_id,
            signal=sample.signal,
            data_type=declared,
            width=counter.width,
            signed=counter.signed,
        )

    async def _engine_loop(self) -> None:
        while True:
            sample = await self.samples.get()
            self.samples_total += 1
            try:
                self._feed(sample)
                if self.raw_samples is not None and (raw := self.raw_samples.feed(sample)):
                    self.pending.append(raw)
            except (KeyError, ValueError) as exc:
                self.samples_ignored += 1
                self.log.warning("sample ignored", error=str(exc))

    async def _flush_loop(self) -> None:
        cadence = StatusCadence(self.config.agent.status_interval)
        while True:
            await asyncio.sleep(self.config.uplink.flush_interval)
            now = self.clock()
            if cadence.due(now, time.monotonic()):
                self.pending.append(self.status_event(now))
            self.flush(now)

    def status_event(self, now: datetime | None = None) -> Event:
        """The agent's health as the cloud's fleet view reads it (AgentEvent code "status").

        data keys: version, outbox_depth, outbox_events, outbox_bytes, outbox_quota_bytes,
        outbox_oldest_unacked_s, acked_seq_high_water, epoch, next_seq, status_interval_s (how
        often this report comes, so the cloud can tell a late agent), connectors
        ({id: connected}), uplink ({connected, published, resent, acked_batches,
        acks_rejected, rejected_batches}), agent_time (the agent's clock, for the cloud's
        offset estimate).
        """
        stats = self.outbox.stats()
        up = self.uplink.stats
        if now is None:
            now = self.clock()
        return self._agent_event(
            now,
            "status",
            "agent status",
            {
                "version": AGENT_VERSION,
                "outbox_depth": stats.depth,
                "outbox_events": stats.events,
                "outbox_bytes": stats.bytes,
                "outbox_quota_bytes": stats.max_bytes,
                "outbox_oldest_unacked_s": stats.oldest_unacked_age_s,
                "acked_seq_high_water": stats.acked_seq_high_water,
                "epoch": stats.epoch,
                "next_seq": stats.next_seq,
                "status_interval_s": self.config.agent.status_interval,
                "connectors": {hub.config.id: hub.connected for hub in self.hubs},
                "uplink": {
                    "connected": up.connected,
                    "published": up.published,
                    "resent": up.resent,
                    "acked_batches": up.acked_batches,
                    "acks_rejected": up.acks_rejected,
                    "rejected_batches": up.rejected_batches,
                },
                "agent_time": now.isoformat(),
            },
        )

    def record(self, samples: Iterable[Sample], end: datetime, *, flush_every_s: float) -> int:
        """Commit recorded samples to the outbox as `run` would have, on the samples' clock.

        The engine starts at the first sample and flushes every `flush_every_s` of sample
        time and once at `end`; a later `run` resumes from the checkpoint and its uplink
        ships the batches. Returns the number of batches committed."""
        now = [end]
        self.clock = lambda: now[0]
        batches = 0
        started = False
        next_flush = end
        for sample in samples:
            if not started:
                now[0] = sample.ts
                self._resume()
                next_flush = sample.ts + timedelta(seconds=flush_every_s)
                started = True
            while sample.ts >= next_flush:
                now[0] = next_flush
                batches += self.flush()
                next_flush += timedelta(seconds=flush_every_s)
            self.samples_total += 1
            self.pending.extend(self.engine.feed(sample))
        if not started:
            self._resume()
        now[0] = end
        batches += self.flush()
        self.outbox.close()
        return batches

    async def _drain(self, uplink: asyncio.Task[None], limit_s: float) -> None:
        """On stop, give the uplink a bounded time to ship what is committed and get acks."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        self.uplink.notify()
        while loop.time() < deadline and not uplink.done():
            if self.outbox.stats().depth == 0:
                return
            await asyncio.sleep(0.1)
        left = self.outbox.stats().depth
        if left:
            self.log.info("batches stay in the outbox until the next start", batches=left)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            # Always, even when a stage or the graceful stop failed: the outbox is held
            # exclusively, and the next pipeline of this process (a reload, a roll-back)
            # opens it again.
            self.outbox.close()

    async def _run(self, stop: asyncio.Event) -> None:
        self._resume()
        self.flush()
        self.log.info(
            "running",
            equipment=len(self.config.equipment),
            connections=len(self.hubs),
            outbox=str(self.config.outbox_path),
        )
        uplink = asyncio.create_task(self.uplink.run(), name="uplink")
        tasks = [
            asyncio.create_task(self._engine_loop(), name="engine"),
            asyncio.create_task(self._flush_loop(), name="flush"),
        ]
        tasks += [asyncio.create_task(hub.run(self._emit), name=hub.config.id) for hub in self.hubs]
        self.tasks = [uplink, *tasks]
        # Not among the stages: a plant-floor output that fails never stops the agent.
        floor = self.floor.start() if self.floor is not None else []
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(
                [stopper, uplink, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            if floor and self.floor is not None:
                await self.floor.stop()
            # A stage that does not end (a driver that loses its cancellation) is named and
            # left behind, so the graceful stop still commits what was sampled instead of
            # waiting for it until systemd kills the agent.
            for task in await cancel_and_wait(tasks):
                self.log.error(
                    "stage did not stop when cancelled; stopping without it",
                    stage=task.get_name(),
                )
            # Graceful stop: whatever was sampled is committed with its checkpoint.
            while not self.samples.empty():
                with contextlib.suppress(KeyError, ValueError):
                    self._feed(self.samples.get_nowait())
            self.flush()
            for hub in self.hubs:
                await hub.__aexit__()
            with contextlib.suppress(Exception):
                await self._drain(uplink, self.config.uplink.drain_timeout)
            uplink.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await uplink
            self.outbox.close()
            self.log.info("stopped")
