"""The unit files: `systemd-analyze verify` accepts them (when the tool is installed), and the
properties the operations promise are set."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
NAMES = ["edge-agent.service", "cloud-api.service", "cloud-ingest.service", "cloud-alerts.service"]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
    "RestrictSUIDSGID": "yes",
}


def unit(name: str) -> dict[str, list[str]]:
    """Section.Key -> values (systemd keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def stop_timeout_s(name: str = "edge-agent.service") -> float:
    value = unit(name)["Service.TimeoutStopSec"][-1]
    assert value.endswith("s"), value
    return float(value[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: point it at this checkout's venv.
    bin_dir = Path(sys.executable).parent
    text = (UNITS / name).read_text(encoding="utf-8")
    for prefix in ("/opt/edge-agent/venv/bin/", "/opt/cloud-api/venv/bin/"):
        text = text.replace(prefix, f"{bin_dir}/")
    copy = tmp_path / name
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 even for unknown keys; any remark about our file counts as a failure.
    remarks = [ln for ln in (result.stdout + result.stderr).splitlines() if name in ln]
    assert result.returncode == 0 and not remarks, result.stdout + result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_unit_is_hardened_and_restarts(name: str) -> None:
    u = unit(name)
    for key, expected in HARDENING.items():
        assert u.get(f"Service.{key}") == [expected], key
    assert u["Service.Restart"] == ["always"]
    assert int(u["Service.LimitNOFILE"][0]) >= 65536
    user = u["Service.User"][0]
    assert user and user != "root"
    assert any(k.startswith("Service.SystemCallFilter") for k in u)


def test_edge_agent_unit_is_notify_with_watchdog() -> None:
    u = unit("edge-agent.service")
    assert u["Service.Type"] == ["notify"]
    assert u["Service.WatchdogSec"][0].endswith("s")
    assert u["Service.StateDirectory"] == ["edge-agent"]
    assert u["Service.ConfigurationDirectory"] == ["edge-agent"]
    assert u["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["Service.DevicePolicy"] == ["closed"]
    # the uplink's default drain (5 s) and the last commit fit in the stop timeout
    assert stop_timeout_s() >= 15


def test_serial_drop_in_opens_only_serial_ports() -> None:
    u = unit("edge-agent-serial.conf")
    assert u["Service.PrivateDevices"] == ["no"]
    assert u["Service.DevicePolicy"] == ["closed"]
    assert sorted(u["Service.DeviceAllow"]) == [
        "char-ttyACM rw",
        "char-ttyS rw",
        "char-ttyUSB rw",
    ]
