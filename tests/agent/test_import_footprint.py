"""An agent configured with Modbus only imports no library it does not use: not the OPC UA
client or server (asyncua), not Sparkplug B's protobuf, not the HTTP client of `status`, not
prometheus-client (its own writer serves /metrics). No agent imports pydantic or PyYAML: its
configuration is parsed and validated in a child process (agent.configcheck), at start and
at reload.

The agent runs in a fresh interpreter (imports already made by other tests would hide one),
through the service `edge-agent run` starts, until its pipeline has committed its first
flush and a reload (SIGHUP's path) has replaced it; then it lists the modules it has
imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sync.keys import CloudKeyring
from tests.conftest import free_port, make_agent_keys

CONFIG = """
agent: {{id: edge-imports, site: plant-imports, state_dir: {state}}}
connections:
  - {{id: plc, type: modbus, host: 127.0.0.1, port: {plc_port}, poll_interval: 1s}}
mqtt: {{host: 127.0.0.1, port: {mqtt_port}, topic_prefix: "imports/"}}
health: {{port: {health_port}}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 2s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running}}}}
      total_count: {{address: "holding:1", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material}}}}
"""

RUN = """
import asyncio, json, sys
from pathlib import Path

import agent.cli  # the module behind the `edge-agent` command
from agent.configcheck import load_config_apart
from agent.service import AgentService
from sync.keys import AgentKeys

path = Path(sys.argv[1])
config = load_config_apart(path)  # as `edge-agent run` loads it
service = AgentService(path, config, AgentKeys.load(config.keys_dir))


async def flushed(task: asyncio.Task[None], reloads: int) -> None:
    for _ in range(6000):  # up to 10 minutes on a loaded machine
        runtime = service.runtime
        if task.done() or (
            service.reloads.applied >= reloads
            and runtime is not None
            and getattr(runtime, "last_flush", None)
        ):
            return
        await asyncio.sleep(0.1)


async def main() -> None:
    task = asyncio.create_task(service.run())
    await flushed(task, 0)
    service.request_reload()
    await flushed(task, 1)
    assert service.reloads.applied == 1, service.reloads
    service.request_stop()
    await task


asyncio.run(main())
print(json.dumps(sorted(sys.modules)))
"""

NOT_FOR_MODBUS = (
    "asyncua",
    "google.protobuf",
    "httpx",
    "agent.floor.opcua_server",
    "agent.floor.sparkplug",
    "connectors.opcua.hub",
    # /metrics is written by agent.exposition: prometheus-client (and the http.server,
    # wsgiref it imports) is for the cloud and for `edge-agent status`.
    "prometheus_client",
    "wsgiref",
    "http.server",
)


# Parsing and validating the file is done in a child process: these would stay in the
# agent's memory for good. The version is read without importlib.metadata (sync/version.py).
NOT_IN_ANY_AGENT = ("pydantic", "pydantic_core", "annotated_types", "yaml", "importlib.metadata")


def test_a_modbus_only_agent_does_not_import_what_it_does_not_use(
    tmp_path: Path, cloud_keys: CloudKeyring
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    config.write_text(
        CONFIG.format(
            state=state,
            plc_port=free_port(),  # nothing listens: the hub backs off, which is enough here
            mqtt_port=free_port(),  # the cloud is unreachable: batches wait in the outbox
            health_port=free_port(),
        ),
        encoding="utf-8",
    )
    make_agent_keys(state / "keys", cloud_keys)
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(config)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    # It ran the Modbus pipeline, the uplink and the metrics endpoint.
    assert {"agent.runtime", "connectors.modbus.hub", "paho.mqtt.client"} <= modules
    assert "agent.health" in modules
    imported = sorted(
        m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_FOR_MODBUS)
    )
    assert imported == []
    validators = sorted(
        m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_IN_ANY_AGENT)
    )
    assert validators == []
