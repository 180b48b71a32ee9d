"""Key lifecycle: a retired or revoked token signing key, a revoked token and a revoked agent
key take effect within the documented bound without a restart, tokens verified before are
checked again, the maximum token lifetime holds at verification, and unknown key ids do not
reach the disk or the identity provider more than once per refresh period.

The waits below are the documented bound itself (two refresh periods for the API, one for
ingest), not a guess at how fast something runs: a process whose view is older than the
bound reads it again before it answers, so any request sent after the wait must see the
change, however slow the machine is."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cloud_api.access import auth
from cloud_api.access.auth import TokenKeyring, generate_token_key
from cloud_api.access.revocations import REFRESH_S
from cloud_api.cli import main as cli_main
from cloud_api.config import FailureLimit
from cloud_api.ingest.worker import IngestWorker
from connectors.sample import Sample
from sync.keys import CloudKeyring
from sync.uplink import BrokerSettings, make_client
from tests.cloud_api.ingestion import enrolled_agent, press_spec
from tests.cloud_api.securitykit import T0, WINDOW, SecuredApi, secured_api, seed_two_sites
from tests.conftest import MQTT_HOST, MQTT_PORT

OEE_A = "/v1/equipment/press-a/oee"
REFRESH = 0.3  # the API's refresh period in these tests; the bound is twice that
# Many refused tokens from one address, without the throttle answering them first.
UNTHROTTLED = FailureLimit(per_minute=10_000, burst=10_000)


def cli(settings_url: str, keys_dir: Path, tmp_path: Path, *argv: str) -> int:
    config = tmp_path / "cloud.yaml"
    config.write_text(
        f"database: {{url: '{settings_url}'}}\nkeys_dir: '{keys_dir}'\n"
        f"security: {{revocation_refresh_seconds: {REFRESH}}}\n",
        encoding="utf-8",
    )
    return cli_main(["--config", str(config), *argv])


def wait_out_the_bound(refresh_s: float = REFRESH, periods: int = 2) -> None:
    time.sleep(refresh_s * periods)


@pytest.fixture
def api(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> SecuredApi:
    seed_two_sites(pg_url)
    return secured_api(pg_url, pool, tmp_path, revocation_refresh_seconds=REFRESH)


async def status(api: SecuredApi, token: str) -> tuple[int, str]:
    async with api.client() as client:
        r = await client.get(OEE_A, params=WINDOW, headers={"Authorization": f"Bearer {token}"})
    return r.status_code, r.text


async def test_removed_key_files_refuse_its_tokens_without_restart(api: SecuredApi) -> None:
    old_kid, _ = TokenKeyring.load(api.keys_dir).current
    used = api.token("viewer", ["site-a"])
    never_seen = api.token("viewer", ["site-a"])
    assert (await status(api, used))[0] == 200  # verified and remembered
    new_kid = generate_token_key(api.keys_dir)
    fresh = api.token("viewer", ["site-a"])
    assert jwt.get_unverified_header(fresh)["kid"] == new_kid
    # A new key is read from the directory within a refresh period (unknown key ids do not
    # read it more often).
    wait_out_the_bound(periods=1)
    assert (await status(api, fresh))[0] == 200
    for suffix in ("key", "pub"):
        (api.keys_dir / f"jwt-{old_kid}.{suffix}").unlink()
    wait_out_the_bound()
    for token in (used, never_seen):
        code, body = await status(api, token)
        assert code == 401 and "unknown key" in body, body
    assert (await status(api, fresh))[0] == 200


async def test_revoked_signing_key_is_refused_even_where_its_files_remain(
    api: SecuredApi, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_kid, _ = TokenKeyring.load(api.keys_dir).current
    used = api.token("viewer", ["site-a"])
    assert (await status(api, used))[0] == 200
    # Another host's copy of the key directory: the CLI deletes the files there, while this
    # API process still has them on its disk.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(api.keys_dir, elsewhere)
    assert cli(pg_url, elsewhere, tmp_path, "tokens", "revoke-key", old_kid) == 2
    assert "current signing key" in capsys.readouterr().err
    assert cli(pg_url, elsewhere, tmp_path, "tokens", "rotate-key") == 0
    assert (
        cli(pg_url, elsewhere, tmp_path, "tokens", "revoke-key", old_kid, "--reason", "leak") == 0
    )
    assert not (elsewhere / f"jwt-{old_kid}.key").exists()
    assert (api.keys_dir / f"jwt-{old_kid}.key").exists()
    wait_out_the_bound()
    code, body = await status(api, used)
    assert code == 401 and "revoked" in body, body
    # Signed with the stolen key after the revocation: refused too.
    code, _ = await status(api, api.token("viewer", ["site-a"]))
    assert code == 401
    with psycopg.connect(pg_url) as conn:
        actions = [r[0] for r in conn.execute("SELECT action FROM audit.records ORDER BY id")]
    assert actions[-1] == "tokens.revoke_key"


async def test_revoked_token_that_was_verified_before_is_refused_within_the_bound(
    api: SecuredApi, pg_url: str, tmp_path: Path
) -> None:
    token = api.token("viewer", ["site-a"])
    assert (await status(api, token))[0] == 200
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert cli(pg_url, api.keys_dir, tmp_path, "tokens", "revoke", jti) == 0
    wait_out_the_bound()
    code, body = await status(api, token)
    assert code == 401 and "revoked" in body, body


async def test_a_view_that_cannot_be_read_again_is_not_served(api: SecuredApi, pg_url: str) -> None:
    token = api.token("viewer", ["site-a"])
    assert (await status(api, token))[0] == 200
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("REVOKE SELECT ON ops.credential_stamp FROM gateway_api")
    wait_out_the_bound()
    async with api.client() as client:
        r = await client.get(OEE_A, params=WINDOW, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("GRANT SELECT ON ops.credential_stamp TO gateway_api")
    assert (await status(api, token))[0] == 200


async def test_maximum_lifetime_holds_at_verification(api: SecuredApi) -> None:
    ring = TokenKeyring.load(api.keys_dir)
    kid, key = ring.current
    now = int(datetime.now(UTC).timestamp())
    limit = api.settings.security.max_token_ttl_seconds
    base = {
        "iss": api.settings.security.issuer, "aud": api.settings.security.audience,
        "sub": "x", "role": "viewer", "sites": ["site-a"], "iat": now, "nbf": now,
        "jti": "ttl",
    }  # fmt: skip
    ten_years = jwt.encode(
        {**base, "exp": now + 10 * 365 * 86400}, key, algorithm="EdDSA", headers={"kid": kid}
    )
    code, body = await status(api, ten_years)
    assert code == 401 and "lifetime exceeds" in body, body
    one_over = jwt.encode({**base, "exp": now + limit + 1}, key, "EdDSA", headers={"kid": kid})
    assert (await status(api, one_over))[0] == 401
    at_limit = jwt.encode({**base, "exp": now + limit}, key, "EdDSA", headers={"kid": kid})
    assert (await status(api, at_limit))[0] == 200


async def test_unknown_key_ids_read_the_key_directory_once_per_period(
    pg_url: str, pool: ConnectionPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_two_sites(pg_url)
    api = secured_api(
        pg_url, pool, tmp_path, revocation_refresh_seconds=60, auth_failures=UNTHROTTLED
    )
    reads: list[Path] = []
    load = TokenKeyring.load.__func__  # type: ignore[attr-defined]

    def counted(cls: type[TokenKeyring], directory: Path) -> TokenKeyring:
        reads.append(directory)
        return load(cls, directory)  # type: ignore[no-any-return]

    monkeypatch.setattr(auth.TokenKeyring, "load", classmethod(counted))
    assert (await status(api, api.token("viewer", ["site-a"])))[0] == 200
    before = len(reads)
    ring_key = load(TokenKeyring, api.keys_dir).current[1]
    now = int(datetime.now(UTC).timestamp())
    claims = {
        "iss": api.settings.security.issuer, "aud": api.settings.security.audience,
        "sub": "x", "role": "viewer", "sites": ["site-a"], "iat": now, "nbf": now,
        "exp": now + 600, "jti": "u",
    }  # fmt: skip
    for i in range(200):
        forged = jwt.encode(claims, ring_key, "EdDSA", headers={"kid": f"{i:016x}"})
        code, _ = await status(api, forged)
        assert code == 401
    assert len(reads) - before <= 1, len(reads) - before


# --- agent keys, with the real ingest worker on the machine's broker ------------------------


def _published(topic: str, payload: bytes) -> None:
    client = make_client(BrokerSettings(host=MQTT_HOST, port=MQTT_PORT), "lifecycle-test")
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _outcome(pg_url: str, agent: str, seq: int) -> str:
    """'stored' or the quarantine reason of (agent, seq), once ingest has handled it."""
    deadline = time.monotonic() + 30
    with psycopg.connect(pg_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute(
                "SELECT 1 FROM facts.batches WHERE agent_id = %s AND seq = %s", (agent, seq)
            ).fetchone():
                return "stored"
            row = conn.execute(
                "SELECT reason FROM ops.quarantine WHERE agent_id = %s AND seq = %s",
                (agent, seq),
            ).fetchone()
            if row:
                return str(row[0])
            time.sleep(0.05)
    raise AssertionError(f"ingest never handled batch {seq} of {agent}")


def test_revoked_agent_key_is_refused_by_running_ingest(
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
    tmp_path: Path,
) -> None:
    agent = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "agent", agent_id="edge-1", site_id="plant-a",
        topic_prefix=topic_prefix,
    )  # fmt: skip
    press = press_spec("press-1")
    running = [Sample("press-1", "state", 1, T0)]
    events = agent.engine_events([press], running, T0, T0 + timedelta(seconds=30))
    _published(agent.topic, agent.sealed(events))
    assert _outcome(pg_url, "edge-1", 1) == "stored"
    kid = agent.keys.signing_key_id
    assert cli(pg_url, tmp_path / "k", tmp_path, "agents", "revoke-key", "--agent", "edge-1",
               "--key-id", kid, "--last") == 0  # fmt: skip
    wait_out_the_bound(REFRESH_S, periods=1)
    at = T0 + timedelta(minutes=1)
    later = agent.engine_events(
        [press], [Sample("press-1", "state", 2, at)], at, at + timedelta(seconds=30)
    )
    _published(agent.topic, agent.sealed(later))
    assert _outcome(pg_url, "edge-1", 2) == "unknown_agent"
