"""Starts and stops the configured plant-floor outputs beside the agent's pipeline.

They run as their own asyncio tasks and only read: a failure in one is logged and retried
inside it, and nothing here can stop or slow the polling, the engine or the outbox. Each
output's libraries (asyncua for the OPC UA server, protobuf for Sparkplug B) are imported
only when that output is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent.floor.config import OpcUaServerConfig, PlantMqttConfig
from agent.floor.live import LiveSource
from oee.engine import PlantEngine
from oee.events import Event

if TYPE_CHECKING:
    from agent.floor.opcua_server import PlantOpcUaServer
    from agent.floor.sparkplug import PlantPublisher


class PlantFloor:
    """The OPC UA server and the plant MQTT publisher of one agent (either may be absent)."""

    def __init__(
        self,
        *,
        engine: PlantEngine,
        agent: str,
        site: str,
        lines: Mapping[str, str | None],
        connections: Mapping[str, str | None],
        connection_ids: list[str],
        links: Callable[[], Mapping[str, bool]],
        outbox_depth: Callable[[], int],
        keys_dir: Path,
        plant_mqtt: PlantMqttConfig | None,
        opcua_server: OpcUaServerConfig | None,
        state_dir: Path | None = None,
    ) -> None:
        self.source = LiveSource(engine, lines, connections, links, outbox_depth)
        self.publisher: PlantPublisher | None = None
        if plant_mqtt is not None:
            from agent.floor.slim import UNUSED_WITH_UPB, deferred

            with deferred(UNUSED_WITH_UPB):  # protobuf's pure-Python messages (slim.py)
                from agent.floor.sparkplug import build_publisher

            self.publisher = build_publisher(plant_mqtt, self.source, agent=agent, site=site)
        self.opcua: PlantOpcUaServer | None = None
        if opcua_server is not None:
            from agent.floor.slim import deferred, lazy_dataclass_methods, object_ids_from_source

            # What asyncua imports and the server does not use, and the methods of its
            # dataclasses, made when first used; its table of standard node ids made
            # compact from its source (agent/floor/slim.py).
            with deferred(), lazy_dataclass_methods(), object_ids_from_source():
                from agent.floor.opcua_server import PlantOpcUaServer

            self.opcua = PlantOpcUaServer(
                opcua_server,
                self.source,
                site=site,
                keys_dir=keys_dir,
                connections=connection_ids,
                state_dir=state_dir,
            )
        self.tasks: list[asyncio.Task[None]] = []

    def observe(self, events: Iterable[Event]) -> None:
        self.source.observe(events)

    def start(self) -> list[asyncio.Task[None]]:
        if self.publisher is not None:
            self.tasks.append(asyncio.create_task(self.publisher.run(), name="plant-mqtt"))
        if self.opcua is not None:
            self.tasks.append(asyncio.create_task(self.opcua.run(), name="opcua-server"))
        return self.tasks

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self.tasks = []
