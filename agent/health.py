"""The agent's local health and metrics endpoint on 127.0.0.1 (port from `health.port`).

`GET /healthz` answers 200 while the pipeline is alive (the same test the systemd watchdog
uses) and 503 with the reason otherwise; `GET /metrics` is the Prometheus text format with
per connection status and read latency, samples per second, per equipment current state and
OEE of the running shift, outbox depth/bytes/oldest age, bytes and fsyncs it wrote, acks,
resends and rejects. `GET /outbox` and `GET /outbox/keys` answer what `edge-agent buffer
stats` and `keys status` print (the running agent holds its outbox exclusively, so those
commands ask it: agent/outbox_report.py). The
values are read from the running pipeline at scrape time, so a configuration reload shows up
at the next scrape. The server is a small HTTP/1.1 responder on asyncio: a few read-only
routes do not justify a web framework on the edge box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from agent.exposition import CONTENT_TYPE, MetricFamily, counter, gauge, render
from oee.engine import to_us

log = structlog.get_logger("agent.health")

HOST = "127.0.0.1"
# The states the engine knows; every one is exported so a dashboard sees a 0 -> 1 change.
STATES = ("running", "idle", "fault", "setup", "planned_stop", "unknown")


class Supervised(Protocol):
    """What the health server reads from the service (see agent/service.py)."""

    runtime: Any
    config: Any
    reloads: Any
    started_at: float

    def problem(self) -> str | None: ...
    def monotonic(self) -> float: ...


class SampleRate:
    """Samples per second over the last completed window of a few seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._mark: tuple[float, int, object] | None = None
        self.per_second = 0.0

    def update(self, now: float, total: int, source: object) -> float:
        # A reload brings a new runtime whose counter restarts: start a new window.
        if self._mark is None or self._mark[2] is not source or total < self._mark[1]:
            self._mark = (now, total, source)
            return self.per_second
        since, count, _ = self._mark
        if now - since >= self.window_s:
            self.per_second = (total - count) / (now - since)
            self._mark = (now, total, source)
        return self.per_second


def _now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


class AgentCollector:
    """Reads the live pipeline at each scrape."""

    def __init__(self, service: Supervised) -> None:
        self.service = service
        self.rate = SampleRate()

    def collect(self) -> Iterator[MetricFamily]:
        service = self.service
        runtime = service.runtime
        config = service.config
        agent = config.agent
        info = gauge("edge_agent_info", "The running agent", labels=["agent", "site", "version"])
        version = _version()
        info.add_metric([agent.id, agent.site, version], 1.0)
        yield info
        problem = service.problem()
        yield _gauge("edge_agent_pipeline_alive", "1 while every stage runs", problem is None)
        yield _gauge(
            "edge_agent_uptime_seconds",
            "Seconds since the service started",
            service.monotonic() - service.started_at,
        )
        reloads = service.reloads
        yield _gauge(
            "edge_agent_config_generation",
            "Configuration in use (1 = as started)",
            reloads.generation,
        )
        reload_counts = counter(
            "edge_agent_config_reloads", "SIGHUP reloads by result", labels=["result"]
        )
        reload_counts.add_metric(["applied"], reloads.applied)
        reload_counts.add_metric(["rejected"], reloads.rejected)
        yield reload_counts
        if runtime is None:
            return
        yield from self._connections(runtime)
        yield from self._samples(runtime)
        yield from self._equipment(runtime)
        yield from self._outbox(runtime)
        yield from self._uplink(runtime)

    def _connections(self, runtime: Any) -> Iterable[MetricFamily]:
        up = gauge(
            "edge_agent_connection_up", "1 while the PLC connection is up", labels=["connection"]
        )
        latency = gauge(
            "edge_agent_connection_read_latency_seconds",
            "Duration of the last complete read cycle of the connection",
            labels=["connection"],
        )
        requests = counter(
            "edge_agent_connection_requests",
            "Requests sent to the PLC over the connection",
            labels=["connection"],
        )
        for hub in runtime.hubs:
            name = str(getattr(hub, "connection_id", None) or hub.config.id)
            up.add_metric([name], 1.0 if hub.connected else 0.0)
            if hub.last_read_latency_s is not None:
                latency.add_metric([name], float(hub.last_read_latency_s))
            requests.add_metric([name], float(getattr(hub, "requests", 0)))
        yield from (up, latency, requests)

    def _samples(self, runtime: Any) -> Iterable[MetricFamily]:
        total = int(runtime.samples_total)
        rate = self.rate.update(self.service.monotonic(), total, runtime)
        yield counter("edge_agent_samples", "Samples read from PLCs", value=total)
        yield _gauge("edge_agent_samples_per_second", "Samples per second, last few seconds", rate)
        yield counter(
            "edge_agent_samples_rejected",
            "Samples the OEE engine refused (unknown equipment, bad value)",
            value=int(runtime.samples_ignored),
        )

    def _equipment(self, runtime: Any) -> Iterable[MetricFamily]:
        state = gauge(
            "edge_agent_equipment_state",
            "1 for the equipment's current state, 0 for the others",
            labels=["equipment", "state"],
        )
        since = gauge(
            "edge_agent_equipment_state_seconds",
            "Seconds the equipment has been in its current state",
            labels=["equipment"],
        )
        oee = gauge(
            "edge_agent_shift_oee_ratio",
            "A, P, Q and OEE of the running shift over its closed buckets",
            labels=["equipment", "shift", "ratio"],
        )
        now_us = _now_us()
        for equipment_id, snap in runtime.engine.snapshots().items():
            current = snap.state
            for name in {*STATES, current}:
                state.add_metric([equipment_id, name], 1.0 if name == current else 0.0)
            if snap.state_since is not None:
                started_us = to_us(snap.state_since)
                since.add_metric([equipment_id], max(0.0, (now_us - started_us) / 1_000_000))
            shift = snap.closed_shift  # the shift the cloud has buckets of, as it reports
            if shift is not None:
                ratios = shift.ratios
                for name in ("availability", "performance", "quality", "oee"):
                    value = getattr(ratios, name)
                    if value is not None:
                        oee.add_metric([equipment_id, shift.name, name], float(value))
        yield from (state, since, oee)

    def _outbox(self, runtime: Any) -> Iterable[MetricFamily]:
        stats = runtime.outbox.stats()
        yield _gauge("edge_agent_outbox_batches", "Batches waiting for an ack", stats.depth)
        yield _gauge("edge_agent_outbox_events", "Events waiting for an ack", stats.events)
        yield _gauge("edge_agent_outbox_bytes", "Bytes of sealed batches waiting", stats.bytes)
        yield _gauge("edge_agent_outbox_quota_bytes", "The outbox's byte quota", stats.max_bytes)
        yield _gauge(
            "edge_agent_outbox_oldest_age_seconds",
            "Age of the oldest batch not acked (0 when empty)",
            stats.oldest_unacked_age_s or 0.0,
        )
        # Flash wear: what the outbox made the kernel write (its transactions and WAL
        # checkpoints, from /proc/self/io), and the fsyncs SQLite issued for them.
        written = runtime.outbox.counters
        yield counter(
            "edge_agent_outbox_written_bytes",
            "Bytes the outbox's transactions and checkpoints wrote to storage",
            value=written.bytes,
        )
        yield counter(
            "edge_agent_outbox_fsyncs", "fsyncs of the outbox's files", value=written.fsyncs
        )
        yield counter(
            "edge_agent_outbox_commits", "Write transactions committed", value=written.commits
        )
        yield counter(
            "edge_agent_outbox_sealed_bytes",
            "Bytes of sealed batches stored (what the written bytes carry)",
            value=written.sealed_bytes,
        )
        yield counter(
            "edge_agent_outbox_batches_stored",
            "Sealed batches stored (their bytes: edge_agent_outbox_sealed_bytes)",
            value=written.batches,
        )
        yield _gauge(
            "edge_agent_outbox_open_seconds",
            "Seconds since the outbox was opened (the written counters start then)",
            max(0.0, time.monotonic() - written.opened_at),
        )

    def _uplink(self, runtime: Any) -> Iterable[MetricFamily]:
        stats = runtime.uplink.stats
        yield _gauge("edge_agent_broker_connected", "1 while connected to MQTT", stats.connected)
        yield counter("edge_agent_batches_published", "Batch publishes", value=stats.published)
        yield counter("edge_agent_acks", "Batches acked by the cloud", value=stats.acked_batches)
        yield counter(
            "edge_agent_resends", "Batches sent again after a timeout", value=stats.resent
        )
        yield counter(
            "edge_agent_acks_rejected",
            "Acks refused (bad signature, unknown key, foreign agent)",
            value=stats.acks_rejected,
        )
        yield counter(
            "edge_agent_batches_rejected",
            "Batches the cloud refused for good (signed rejection): loss recorded, removed",
            value=stats.rejected_batches,
        )
        floor = getattr(runtime, "floor", None)
        publisher = None if floor is None else floor.publisher
        if publisher is not None:
            plant = publisher.stats
            yield _gauge(
                "edge_agent_plant_broker_connected",
                "1 while connected to the plant broker (plant_mqtt)",
                plant.connected,
            )
            yield counter(
                "edge_agent_plant_messages_published",
                "Messages published to the plant broker (Sparkplug B or UNS JSON)",
                value=plant.published,
            )
            yield counter(
                "edge_agent_plant_updates_dropped",
                "Live values not sent to the plant broker (its queue was full); newer ones follow",
                value=plant.dropped,
            )


def _gauge(name: str, documentation: str, value: float) -> MetricFamily:
    return gauge(name, documentation, value=float(value))


def _version() -> str:
    try:
        from agent.runtime import AGENT_VERSION

        return str(AGENT_VERSION)
    except ImportError:
        return "unknown"


class HealthServer:
    """`await server.start()`; `await server.rebind(settings)` after a reload; `stop()`."""

    def __init__(self, service: Supervised, *, port: int) -> None:
        self.service = service
        self.port = port
        self.collector = AgentCollector(service)
        self._server: asyncio.Server | None = None

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, HOST, port, reuse_address=True)

    async def start(self) -> None:
        try:
            self._server = await self._listen(self.port)
        except OSError as exc:
            # Health is for operators: the pipeline runs without it rather than not at all.
            log.error("health endpoint not available", port=self.port, error=str(exc))
            return
        log.info("health endpoint listening", address=f"http://{HOST}:{self.port}")

    async def rebind(self, settings: Any) -> bool:
        """Move to a new port (if it changed); False, keeping the old one, when it cannot."""
        if not settings.enabled:
            await self.stop()
            return True
        if settings.port == self.port and self._server is not None:
            return True
        try:
            server = await self._listen(settings.port)
        except OSError as exc:
            log.error("new health port not available", port=settings.port, error=str(exc))
            return False
        await self.stop()
        self._server, self.port = server, settings.port
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def render(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE, render(self.collector.collect())
        if path == "/healthz":
            problem = self.service.problem()
            runtime = self.service.runtime
            body: dict[str, Any] = {
                "status": "ok" if problem is None else "unhealthy",
                "problem": problem,
                "agent": self.service.config.agent.id,
                "config_generation": self.service.reloads.generation,
            }
            if runtime is not None:
                body["broker_connected"] = bool(runtime.uplink.stats.connected)
                body["outbox_batches"] = runtime.outbox.stats().depth
            return (
                200 if problem is None else 503,
                "application/json",
                json.dumps(body).encode(),
            )
        if path == "/outbox":
            runtime = self.service.runtime
            if runtime is None:
                return 503, "text/plain; charset=utf-8", b"the pipeline is not running\n"
            from agent.outbox_report import stats_report

            report = stats_report(runtime.outbox, runtime.config)
            return 200, "application/json", json.dumps(report).encode()
        return 404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n"

    async def _render_keys(self) -> tuple[int, str, bytes]:
        """`GET /outbox/keys`: reads every unacked batch's header, a page at a time."""
        runtime = self.service.runtime
        if runtime is None:
            return 503, "text/plain; charset=utf-8", b"the pipeline is not running\n"
        from agent.outbox_report import keys_report_async, outbox_name

        report = await keys_report_async(runtime.outbox)
        body = {"outbox": outbox_name(runtime.config), **report}
        return 200, "application/json", json.dumps(body).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, target, _ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain; charset=utf-8", b"GET only\n"
            elif target.split("?", 1)[0] == "/outbox/keys":
                status, ctype, body = await self._render_keys()
            else:
                status, ctype, body = self.render(target.split("?", 1)[0])
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that sends garbage or hangs up gets nothing
        except Exception as exc:
            log.warning("health request failed", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
