"""Pushed configurations on the agent: what is taken, refused, rejected, stored and resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, parse_config
from agent.remote_config import RemoteConfig
from agent.service import check_config
from oee.events import AgentEvent, Event
from sync.config_message import ConfigBody, config_digest, sign_config
from sync.keys import AgentKeys, CloudKeyring
from tests.conftest import make_agent_keys

CONFIG = """
agent:
  id: edge-1
  site: s1
  state_dir: {state}
config:
  source: {source}
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: 5020
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running}}}}
      total_count: {{address: "holding:1", type: uint32}}
{more}"""
PRESS_2 = """  - id: press-2
    connection: plc
    unit: 2
    ideal_cycle_time: 1s
    signals:
      state: {address: "holding:0", map: {0: idle, 1: running}}
      total_count: {address: "holding:1", type: uint32}
"""


class Pipeline:
    """Where a running AgentRuntime collects events to commit (the attribute it reads)."""

    def __init__(self) -> None:
        self.pending: list[Event] = []

    def results(self) -> list[dict[str, Any]]:
        return [e.data for e in self.pending if isinstance(e, AgentEvent)]


def setup(tmp_path: Path, cloud_keys: CloudKeyring, source: str = "cloud") -> RemoteConfig:
    state = tmp_path / "state"
    make_agent_keys(state / "keys", cloud_keys)
    local = parse_config(CONFIG.format(state=state, source=source, more=""), "agent.yaml")
    return remote_for(local)


def remote_for(local: AgentConfig) -> RemoteConfig:
    return RemoteConfig(local, AgentKeys.load(local.keys_dir), check=check_config)


def message(
    remote: RemoteConfig,
    ring: CloudKeyring,
    version: int,
    serial: int,
    *,
    text: str | None = None,
    rollback: bool = False,
) -> bytes:
    if text is None:
        text = CONFIG.format(state=remote.local.agent.state_dir, source="cloud", more=PRESS_2)
    kid, key = ring.current_ack
    body = ConfigBody(
        agent_id="edge-1",
        site_id="s1",
        version=version,
        serial=serial,
        digest=config_digest(text),
        yaml=text,
        key_id=kid,
        rollback=version if rollback else None,
    )
    return sign_config(body, key)


def test_local_source_ignores_pushes(tmp_path: Path, cloud_keys: CloudKeyring) -> None:
    remote = setup(tmp_path, cloud_keys, source="local")
    pipeline = Pipeline()
    remote.attach(pipeline)
    remote.receive(message(remote, cloud_keys, 1, 1))
    assert remote.take() is None and pipeline.pending == []
    assert remote.startup() is None
    assert not remote.folder.exists()


def test_apply_store_and_refuse_what_is_not_newer(tmp_path: Path, cloud_keys: CloudKeyring) -> None:
    remote = setup(tmp_path, cloud_keys)
    pipeline = Pipeline()
    remote.attach(pipeline)
    first = message(remote, cloud_keys, 1, 1)
    remote.receive(first)
    candidate = remote.take()
    assert candidate is not None
    assert [e.id for e in candidate.config.equipment] == ["press-1", "press-2"]
    remote.begin(candidate)
    assert json.loads(remote.attempt_path.read_bytes())["result"] == "trying"
    remote.applied(candidate)
    assert remote.applied_path.read_bytes() == first
    assert remote.applied_path.stat().st_mode & 0o777 == 0o600
    assert remote.attempt_path.stat().st_mode & 0o777 == 0o600
    # The retained message again (a reconnect), or signed again: nothing happens.
    remote.receive(first)
    remote.receive(message(remote, cloud_keys, 1, 1))
    assert remote.take() is None
    # A newer publication of a version that is not newer: refused.
    remote.receive(message(remote, cloud_keys, 1, 2))
    assert remote.take() is None
    # Version 2 is applied; then version 1's publication comes again: a replay.
    remote.receive(message(remote, cloud_keys, 2, 3))
    second = remote.take()
    assert second is not None
    remote.begin(second)
    remote.applied(second)
    remote.receive(first)
    assert remote.take() is None
    results = pipeline.results()
    assert [r["result"] for r in results] == ["applied", "refused", "applied", "refused"]
    assert "not newer than the running version 1" in results[1]["reason"]
    assert "replayed" in results[3]["reason"]
    # A signed rollback naming the earlier version is taken although it is not newer.
    remote.receive(message(remote, cloud_keys, 1, 4, rollback=True))
    assert remote.take() is not None


def test_rejections_carry_yaml_paths_and_lines(tmp_path: Path, cloud_keys: CloudKeyring) -> None:
    remote = setup(tmp_path, cloud_keys)
    pipeline = Pipeline()
    remote.attach(pipeline)
    state = remote.local.agent.state_dir
    bad = CONFIG.format(state=state, source="cloud", more=PRESS_2).replace("unit: 2", "unit: 300")
    remote.receive(message(remote, cloud_keys, 1, 1, text=bad))
    moved = CONFIG.format(state=tmp_path / "elsewhere", source="local", more="")
    remote.receive(message(remote, cloud_keys, 2, 2, text=moved))
    assert remote.take() is None
    first, second = pipeline.results()
    assert first["result"] == "rejected"
    (problem,) = first["problems"]
    assert problem["path"] == "equipment[1].unit"
    assert problem["line"] == bad.splitlines().index("    unit: 300") + 1
    assert second["result"] == "rejected"
    assert {p["path"] for p in second["problems"]} == {"agent.state_dir", "config.source"}


def test_start_after_an_interrupted_apply_runs_the_last_good_version(
    tmp_path: Path, cloud_keys: CloudKeyring
) -> None:
    remote = setup(tmp_path, cloud_keys)
    remote.receive(message(remote, cloud_keys, 1, 1))
    good = remote.take()
    assert good is not None
    remote.begin(good)
    remote.applied(good)
    text = CONFIG.format(state=remote.local.agent.state_dir, source="cloud", more="")
    remote.receive(message(remote, cloud_keys, 2, 2, text=text))
    second = remote.take()
    assert second is not None
    remote.begin(second)  # ... and the process dies here

    again = remote_for(remote.local)
    started = again.startup()
    assert started is not None
    config, _ = started
    assert [e.id for e in config.equipment] == ["press-1", "press-2"]  # version 1
    pipeline = Pipeline()
    again.attach(pipeline)
    (result,) = pipeline.results()
    assert result["result"] == "rolled_back" and result["version"] == 2
    assert result["running_version"] == 1
    # The retained version 2 arrives again: not tried a second time.
    again.receive(message(again, cloud_keys, 2, 2, text=text))
    assert again.take() is None and len(pipeline.results()) == 1
