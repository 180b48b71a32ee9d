"""`cloud-api serve --workers 2` with the machine's Redis: a retired signing key, a revoked
token and a revoked API key are refused by both workers without a restart; a caller gets its
rate tier once, not once per worker; failed authentications of one address share one bucket.

Requests go over many keep-alive connections, which the kernel spreads over both workers
(checked with `ss`), each from its own loopback address so that the refusals expected in one
part do not trip the failure throttle of another. The waits are the documented bound (two
refresh periods), after which every worker must have re-read its view (see
tests/cloud_api/test_key_lifecycle.py)."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import jwt
import pytest
import redis

from cloud_api.access.auth import TokenKeyring, generate_token_key, issue_token
from cloud_api.cli import main as cli_main
from cloud_api.config import SecuritySettings
from tests.cloud_api.test_serve import _argv, _end_group, _sockets, _wait_until_up
from tests.conftest import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
REFRESH = 0.5
CONNECTIONS = 24
VIEWER_BURST = 5
FAILURE_BURST = 5


class Served:
    """The running service, its configuration and its output."""

    def __init__(self, pg_url: str, tmp_path: Path, prefix: str) -> None:
        self.keys = tmp_path / "keys"
        self.config = tmp_path / "cloud.yaml"
        self.config.write_text(
            f"database: {{url: '{pg_url}'}}\n"
            f"keys_dir: '{self.keys}'\n"
            "security:\n"
            f"  revocation_refresh_seconds: {REFRESH}\n"
            f"  redis_url: '{REDIS_URL}'\n"
            f"  redis_prefix: '{prefix}'\n"
            f"  auth_failures: {{per_minute: 1, burst: {FAILURE_BURST}}}\n"
            "  rate_limits:\n"
            f"    viewer: {{per_hour: 1000, burst: {VIEWER_BURST}}}\n"
            "    service: {per_hour: 100000, burst: 10000}\n",
            encoding="utf-8",
        )
        self.output = tmp_path / "serve.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def cli(self, *argv: str) -> int:
        return cli_main(["--config", str(self.config), *argv])

    def token(self, role: str = "service") -> str:
        token, _ = issue_token(
            TokenKeyring.load(self.keys), SecuritySettings(), subject="serve-test",
            role=role, sites=["*"], ttl=timedelta(minutes=10),
        )  # fmt: skip
        return token


def clients(base: str, first_octet: str) -> list[httpx.Client]:
    """One keep-alive connection each, from addresses 127.<first_octet>.0.1, .2, ..."""
    return [
        httpx.Client(
            base_url=base,
            transport=httpx.HTTPTransport(local_address=f"127.{first_octet}.0.{i + 1}"),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        for i in range(CONNECTIONS)
    ]


def codes(pool: list[httpx.Client], headers: dict[str, str]) -> list[int]:
    return [c.get("/v1/sites", headers=headers).status_code for c in pool]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def served(pg_url: str, tmp_path: Path) -> Iterator[Served]:
    prefix = f"test:{secrets.token_hex(4)}:"
    s = Served(pg_url, tmp_path, prefix)
    generate_token_key(s.keys)
    yield s
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def test_two_workers_share_revocations_rate_limits_and_the_failure_throttle(
    served: Served,
) -> None:
    old_kid, _ = TokenKeyring.load(served.keys).current
    used, never_seen = served.token(), served.token()
    env = {"CLOUD_CONFIG": str(served.config), "PATH": "/usr/bin:/bin"}
    with served.output.open("wb") as out:
        proc = subprocess.Popen(
            _argv(served.port), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    pools: list[httpx.Client] = []
    try:
        _wait_until_up(served.base, proc)
        pools = lifecycle = clients(served.base, "1")
        assert codes(lifecycle, bearer(used)) == [200] * CONNECTIONS
        owners = _sockets(served.port, "established")
        assert len(owners) == 2, f"the connections did not reach both workers: {owners}"

        # A caller gets its tier once: five requests of a viewer in all, not five per worker.
        viewer = bearer(served.token("viewer"))
        limited = codes(lifecycle, viewer)
        # At 1,000 an hour the bucket refills one request in 3.6 s; allow for one.
        assert VIEWER_BURST <= limited.count(200) <= VIEWER_BURST + 1, limited
        assert set(limited) == {200, 429}

        # A retired signing key: rotate, remove its files, wait out the bound.
        assert served.cli("tokens", "rotate-key") == 0
        fresh = served.token()
        for suffix in ("key", "pub"):
            (served.keys / f"jwt-{old_kid}.{suffix}").unlink()
        time.sleep(2 * REFRESH)
        assert codes(lifecycle, bearer(used)) == [401] * CONNECTIONS
        assert codes(lifecycle, bearer(never_seen)) == [401] * CONNECTIONS
        assert codes(lifecycle, bearer(fresh)) == [200] * CONNECTIONS

        # A revoked token, verified and remembered by both workers before.
        jti = jwt.decode(fresh, options={"verify_signature": False})["jti"]
        assert served.cli("tokens", "revoke", jti) == 0
        time.sleep(2 * REFRESH)
        assert codes(lifecycle, bearer(fresh)) == [401] * CONNECTIONS

        # A revoked API key (read from the database on each use).
        key = _created_api_key(served)
        assert codes(lifecycle, {"X-API-Key": key}) == [200] * CONNECTIONS
        assert served.cli("apikeys", "revoke", key.split("_")[1]) == 0
        assert codes(lifecycle, {"X-API-Key": key}) == [401] * CONNECTIONS

        # One address failing on both workers: one bucket of five failures (plus the one
        # attempt the second worker lets through before its own charge finds it empty).
        attacker = [
            httpx.Client(
                base_url=served.base,
                transport=httpx.HTTPTransport(local_address="127.9.0.9"),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            for _ in range(CONNECTIONS)
        ]
        pools = pools + attacker
        refused = codes(attacker, bearer("not.a.token"))
        assert set(refused) == {401, 429}, refused
        assert FAILURE_BURST <= refused.count(401) <= FAILURE_BURST + 1, refused
        attackers = _sockets(served.port, "established")
        assert len(attackers) == 2, attackers
    finally:
        for c in pools:
            c.close()
        _end_group(proc)
    log = served.output.read_text(encoding="utf-8", errors="replace")
    first_lines = [
        line
        for line in log.splitlines()
        if "authentication refused" in line and "127.9.0.9" in line
    ]
    # One line per worker at the first refusal of the address (the counts come at the end of
    # the period, which this test does not wait for).
    assert 1 <= len(first_lines) <= 2, first_lines
    assert "not.a.token" not in log


def _created_api_key(served: Served) -> str:
    out = served.config.parent / "apikey.txt"
    with out.open("w") as f, contextlib.redirect_stdout(f):
        assert served.cli("apikeys", "create", "--name", "t", "--sites", "*") == 0
    return out.read_text().strip()
