"""deploy/install-edge.sh, run for real under an alternate root (--root) with this checkout's
virtual environment (--venv): users, chown, pip and systemctl are the parts only a real box
exercises; everything else (directories and modes, configuration, keys, unit, serial drop-in,
upgrade that keeps the outbox) is checked here."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install-edge.sh"
VENV = Path(sys.executable).parent.parent
CLOUD_API = str(Path(sys.executable).parent / "cloud-api")


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MQTT_PASSWORD": "not-a-secret"}
    return subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), "--venv", str(VENV), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(
            ["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = install(root, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not root.exists()
    for step in ("1. user", "2. virtual environment", "3. configuration", "5. systemd unit"):
        assert step in result.stdout
    assert "+ install -m 0644" in result.stdout and "edge-agent.service" in result.stdout


@pytest.fixture
def cloud_public_keys(tmp_path: Path) -> Path:
    out = subprocess.run(
        [CLOUD_API, "--keys-dir", str(tmp_path / "cloud-keys"), "keys", "init"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    path = tmp_path / "cloud.pub"
    path.write_text(out, encoding="utf-8")
    return path


def test_install_then_upgrade_keeps_outbox_config_and_keys(
    tmp_path: Path, cloud_public_keys: Path
) -> None:
    root = tmp_path / "root"
    first = install(root, "--cloud-keys", str(cloud_public_keys))
    assert first.returncode == 0, first.stdout + first.stderr
    etc, state = root / "etc/edge-agent", root / "var/lib/edge-agent"
    assert mode(etc) == 0o750 and mode(etc / "agent.yaml") == 0o640
    assert mode(etc / "environment") == 0o640
    assert mode(state) == 0o700
    keys = state / "keys"
    assert mode(keys / "signing.key") == 0o600
    assert (keys / "cloud-hpke.pub").exists() and (keys / "cloud-ack.pub").exists()
    public = (keys / "signing.pub").read_text(encoding="utf-8").strip()
    assert public.startswith("ed25519:") and public in first.stdout
    assert "cloud-api agents enroll --agent edge-pressline-01 --site plant-a" in first.stdout
    unit = root / "etc/systemd/system/edge-agent.service"
    assert unit.read_bytes() == (REPO / "systemd/edge-agent.service").read_bytes()
    assert not (root / "etc/systemd/system/edge-agent.service.d/serial.conf").exists()
    assert f"state_dir: {state}" in (etc / "agent.yaml").read_text(encoding="utf-8")

    # The agent ran for a while: an outbox with unsent batches; the operator edited the file.
    outbox = state / "outbox.db"
    outbox.write_bytes(os.urandom(4096))
    before = (digest(outbox), outbox.stat().st_mtime_ns, digest(keys / "signing.key"))
    config = etc / "agent.yaml"
    edited = config.read_text(encoding="utf-8").replace(
        "  # - id: rs485\n  #   type: modbus-rtu\n  #   port: /dev/ttyUSB0",
        "  - id: rs485\n    type: modbus-rtu\n    port: /dev/ttyUSB0",
    )
    assert "type: modbus-rtu\n" in edited
    config.write_text(edited, encoding="utf-8")

    second = install(root)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "agent.yaml exists: kept as it is" in second.stdout
    assert config.read_text(encoding="utf-8") == edited
    after = (digest(outbox), outbox.stat().st_mtime_ns, digest(keys / "signing.key"))
    assert after == before, "an upgrade must not touch the outbox or the keys"
    assert public in second.stdout
    drop_in = root / "etc/systemd/system/edge-agent.service.d/serial.conf"
    assert drop_in.read_bytes() == (REPO / "systemd/edge-agent-serial.conf").read_bytes()


def test_bad_configuration_stops_with_a_hint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: {id: x}\n", encoding="utf-8")
    result = install(tmp_path / "root", "--config", str(bad))
    assert result.returncode != 0
    assert "run this installer again" in result.stderr
    assert not (tmp_path / "root/var/lib/edge-agent/keys/signing.key").exists()
