"""One agent per state folder, with two real `edge-agent run` processes: the second exits at
once naming the folder and the first one's PID; read-only commands work beside the first."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sync.keys import CloudKeyring
from tests.conftest import free_port, make_agent_keys

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

CONFIG = """
agent: {{id: edge-lock, site: plant-lock, state_dir: {state}}}
connections:
  - {{id: plc, type: modbus, host: 127.0.0.1, port: {plc_port}, poll_interval: 200ms}}
mqtt: {{host: 127.0.0.1, port: {mqtt_port}}}
uplink: {{flush_interval: 200ms, drain_timeout: 200ms}}
health: {{port: {health_port}}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running}}}}
      total_count: {{address: "holding:1", type: uint32}}
"""


def _config(tmp_path: Path, name: str, state: Path, health_port: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        CONFIG.format(
            state=state,
            plc_port=free_port(),  # nothing listens: the hub backs off, the agent runs on
            mqtt_port=free_port(),  # the cloud is unreachable
            health_port=health_port,
        ),
        encoding="utf-8",
    )
    return path


def _edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE_AGENT, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _wait_committed(health_port: int, limit_s: float = 30) -> None:
    """Until the running agent has committed a batch (its own figure: it holds the outbox
    exclusively, so the file cannot be read beside it)."""
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{health_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        for line in text.splitlines():
            if line.startswith("edge_agent_outbox_batches ") and float(line.split()[1]) > 0:
                return
        time.sleep(0.1)
    raise AssertionError("the first agent committed nothing")


def test_a_second_agent_on_the_same_state_folder_exits_at_once(
    tmp_path: Path, cloud_keys: CloudKeyring
) -> None:
    state = tmp_path / "state"
    make_agent_keys(state / "keys", cloud_keys)
    health_port = free_port()
    first_config = _config(tmp_path, "first", state, health_port)
    # Another configuration file, another health port, the same state folder.
    second_config = _config(tmp_path, "second", state, free_port())
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        [EDGE_AGENT, "run", "-c", str(first_config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_committed(health_port)
        second = _edge_agent("run", "-c", str(second_config))
        assert second.returncode == 1, second
        assert str(state) in second.stderr and f"PID {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None, "the first agent keeps running"

        # Read-only commands beside the running agent: the outbox's figures come from the
        # agent itself (its health port), which holds the file exclusively.
        stats = _edge_agent("buffer", "stats", "--json", "-c", str(first_config))
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["depth_batches"] >= 1
        table = _edge_agent("buffer", "stats", "-c", str(first_config))
        assert table.returncode == 0 and "waiting to be acked" in table.stdout, table
        keys = _edge_agent("keys", "status", "--json", "-c", str(first_config))
        assert keys.returncode == 0, keys.stderr
        unacked = json.loads(keys.stdout)["unacked_batches_by_signing_key"]
        assert sum(unacked.values()) >= 1, keys.stdout
        # A configuration whose health port is not the running agent's cannot ask it: a
        # clear error, not a wait on the locked file.
        other = _edge_agent("buffer", "stats", "--json", "-c", str(second_config))
        assert other.returncode == 1 and "running agent" in other.stderr, other
        valid = _edge_agent("validate", "-c", str(second_config))
        assert valid.returncode == 0 and "ok" in valid.stdout, valid
        status = _edge_agent("status", "-c", str(first_config))
        assert status.returncode == 0, status.stderr
        assert "storage writes" in status.stdout and "/day at this rate" in status.stdout
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
        log.close()
    # The lock died with the first agent: a new start on the same folder runs.
    again = subprocess.Popen(
        [EDGE_AGENT, "run", "-c", str(second_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and again.poll() is None:
            if (state / "agent.lock").read_text().strip() == str(again.pid):
                break
            time.sleep(0.1)
        assert again.poll() is None, "the agent did not start after the first one stopped"
        assert (state / "agent.lock").read_text().strip() == str(again.pid)
    finally:
        again.kill()  # kill -9: the kernel releases the lock
        again.wait(30)
    third = subprocess.Popen(
        [EDGE_AGENT, "run", "-c", str(first_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and third.poll() is None:
            if (state / "agent.lock").read_text().strip() == str(third.pid):
                break
            time.sleep(0.1)
        assert third.poll() is None and (state / "agent.lock").read_text().strip() == str(
            third.pid
        ), "a kill -9 left the lock behind"
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait(60)


def test_is_held_tells_whether_an_agent_holds_the_folder_without_taking_the_lock(
    tmp_path: Path,
) -> None:
    from agent.statelock import is_held, lock_state_folder

    folder = tmp_path / "state"
    assert not is_held(folder)  # no lock file yet
    lock = lock_state_folder(folder)
    try:
        assert is_held(folder)
        assert is_held(folder)  # asking twice takes nothing: the holder keeps it
    finally:
        lock.release()
    assert not is_held(folder)
    again = lock_state_folder(folder)  # nothing left behind by the questions
    again.release()


def test_commands_refuse_the_answer_of_another_agent_on_the_same_health_port(
    tmp_path: Path, cloud_keys: CloudKeyring
) -> None:
    """Two agents on one box, each with its own state folder, both left on one health port:
    the second one's endpoint cannot bind, so its port answers for the first agent. Its
    `buffer stats` and `keys status` say so instead of printing the other agent's outbox."""
    health_port = free_port()
    agents = []
    try:
        for name in ("one", "two"):
            state = tmp_path / name
            make_agent_keys(state / "keys", cloud_keys)
            config = _config(tmp_path, name, state, health_port)
            log = (tmp_path / f"{name}.log").open("wb")
            agents.append(
                (
                    config,
                    subprocess.Popen(
                        [EDGE_AGENT, "run", "-c", str(config)], stdout=log, stderr=log
                    ),
                    log,
                )
            )
            if name == "one":
                _wait_committed(health_port)
        second_state = tmp_path / "two"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lock = second_state / "agent.lock"
            if lock.exists() and lock.read_text().strip() == str(agents[1][1].pid):
                break
            assert agents[1][1].poll() is None, (tmp_path / "two.log").read_text()
            time.sleep(0.1)
        else:
            raise AssertionError("the second agent did not take its state folder")

        mine = _edge_agent("buffer", "stats", "--json", "-c", str(agents[0][0]))
        assert mine.returncode == 0, mine.stderr
        assert json.loads(mine.stdout)["outbox"] == str(tmp_path / "one" / "outbox.db")
        for command in (("buffer", "stats"), ("keys", "status")):
            done = _edge_agent(*command, "--json", "-c", str(agents[1][0]))
            assert done.returncode == 1, done
            assert f"keeps its outbox in {tmp_path / 'one' / 'outbox.db'}" in done.stderr
            assert f"not in {tmp_path / 'two' / 'outbox.db'}" in done.stderr, done.stderr
            assert f"health.port {health_port}; give each its own" in done.stderr
    finally:
        for _config_path, process, log in agents:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            log.close()
