"""Authentication and authorisation of the HTTP API: a negative test for every rule, against
the real app and the test's own PostgreSQL database."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg_pool import ConnectionPool

from cloud_api.access.auth import TokenKeyring, generate_token_key
from cloud_api.cli import main as cli_main
from cloud_api.config import FailureLimit, JwksSettings
from tests.cloud_api.securitykit import WINDOW, SecuredApi, secured_api, seed_two_sites

OEE_A = "/v1/equipment/press-a/oee"
OEE_B = "/v1/equipment/press-b/oee"


@pytest.fixture
def api(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> SecuredApi:
    seed_two_sites(pg_url)
    return secured_api(pg_url, pool, tmp_path, revocation_refresh_seconds=0)


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(api: SecuredApi, **overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    base = {
        "iss": api.settings.security.issuer,
        "aud": api.settings.security.audience,
        "sub": "someone",
        "role": "viewer",
        "sites": ["site-a"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "j-" + str(now),
    }
    base.update(overrides)
    return base


def current_key(api: SecuredApi) -> tuple[str, Ed25519PrivateKey]:
    return TokenKeyring.load(api.keys_dir).current


async def get(api: SecuredApi, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with api.client() as client:
        return await client.get(path, params=WINDOW, headers=headers or {})


async def test_valid_token_reads_its_site(api: SecuredApi) -> None:
    r = await get(api, OEE_A, api.headers("viewer", ["site-a"]))
    assert r.status_code == 200, r.text
    assert r.json()["components"]["produced"] == 10
    assert r.headers["RateLimit-Policy"].startswith('"viewer";q=1000;w=3600')


async def test_no_token(api: SecuredApi) -> None:
    r = await get(api, OEE_A)
    assert_problem(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_wrong_scheme_and_garbage(api: SecuredApi) -> None:
    assert_problem(await get(api, OEE_A, {"Authorization": "Basic dXNlcjpwYXNz"}), 401)
    assert_problem(await get(api, OEE_A, {"Authorization": "Bearer not.a.token"}), 401)


async def test_expired_token(api: SecuredApi) -> None:
    old = datetime.now(UTC) - timedelta(hours=2)
    token = api.token("viewer", ["site-a"], now=old, ttl=timedelta(hours=1))
    body = assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {token}"}), 401)
    assert "expired" in body["detail"]


async def test_not_yet_valid_token(api: SecuredApi) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    token = api.token("viewer", ["site-a"], not_before=later, ttl=timedelta(hours=3))
    body = assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {token}"}), 401)
    assert "not valid yet" in body["detail"]


async def test_wrong_signature(api: SecuredApi) -> None:
    kid, _ = current_key(api)
    forged = jwt.encode(
        claims(api, role="admin", sites=["*"]),
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    body = assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {forged}"}), 401)
    assert "signature" in body["detail"]
    # A token whose payload was edited after signing.
    good = api.token("viewer", ["site-a"])
    head, payload, sig = good.split(".")
    edited = json.loads(base64.urlsafe_b64decode(payload + "=="))
    edited["sites"] = ["*"]
    tampered = f"{head}.{b64url(json.dumps(edited).encode())}.{sig}"
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {tampered}"}), 401)


async def test_wrong_audience_and_issuer(api: SecuredApi) -> None:
    kid, key = current_key(api)
    other_aud = jwt.encode(
        claims(api, aud="another-api"), key, algorithm="EdDSA", headers={"kid": kid}
    )
    body = assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {other_aud}"}), 401)
    assert "audience" in body["detail"]
    other_iss = jwt.encode(claims(api, iss="evil"), key, algorithm="EdDSA", headers={"kid": kid})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {other_iss}"}), 401)
    no_exp = claims(api)
    del no_exp["exp"]
    missing = jwt.encode(no_exp, key, algorithm="EdDSA", headers={"kid": kid})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {missing}"}), 401)


async def test_algorithm_none_and_confusion(api: SecuredApi) -> None:
    kid, key = current_key(api)
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    payload = b64url(json.dumps(claims(api, role="admin", sites=["*"])).encode())
    body = assert_problem(
        await get(api, OEE_A, {"Authorization": f"Bearer {header}.{payload}."}), 401
    )
    assert "algorithm" in body["detail"]
    # HMAC keyed with the public key (the classic algorithm confusion).
    public = key.public_key().public_bytes_raw()
    hs = jwt.encode(claims(api), public, algorithm="HS256", headers={"kid": kid})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {hs}"}), 401)


async def test_unknown_kid(api: SecuredApi) -> None:
    _, key = current_key(api)
    token = jwt.encode(claims(api), key, algorithm="EdDSA", headers={"kid": "0" * 16})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {token}"}), 401)


async def test_key_rotation_keeps_old_tokens(api: SecuredApi) -> None:
    old_kid, _ = current_key(api)
    old_token = api.token("viewer", ["site-a"])
    new_kid = generate_token_key(api.keys_dir)
    assert new_kid != old_kid
    new_token = api.token("viewer", ["site-a"])
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    for token in (old_token, new_token):
        r = await get(api, OEE_A, {"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text


async def test_wrong_site_is_not_found(api: SecuredApi) -> None:
    viewer_a = api.headers("viewer", ["site-a"])
    # The route itself does not filter by the caller's sites: row-level security does.
    body = assert_problem(await get(api, OEE_B, viewer_a), 404)
    assert "site-b" not in json.dumps(body)
    r = await get(api, OEE_B, api.headers("viewer", ["site-b"]))
    assert r.status_code == 200, r.text
    r = await get(api, OEE_B, api.headers("admin", ["*"]))
    assert r.status_code == 200, r.text
    async with api.client() as client:
        r = await client.get(OEE_B, params={**WINDOW, "site": "site-b"}, headers=viewer_a)
    assert_problem(r, 404)


async def test_wrong_role(api: SecuredApi) -> None:
    for role in ("viewer", "engineer", "service"):
        async with api.client() as client:
            r = await client.get("/v1/ops/performance", headers=api.headers(role, ["*"]))
        body = assert_problem(r, 403)
        assert "ops" in body["detail"]
    async with api.client() as client:
        r = await client.post(
            "/v1/equipment/press-a/annotations",
            json={
                "site": "site-a",
                "ts": "2026-01-05T06:10:00Z",
                "kind": "downtime",
                "reason": "x",
            },
            headers=api.headers("viewer", ["site-a"]),
        )
    assert_problem(r, 403)


async def test_revoked_token(api: SecuredApi, pg_url: str) -> None:
    token = api.token("viewer", ["site-a"])
    headers = {"Authorization": f"Bearer {token}"}
    assert (await get(api, OEE_A, headers)).status_code == 200
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO ops.revoked_tokens(jti) VALUES (%s)", (jti,))
    body = assert_problem(await get(api, OEE_A, headers), 401)
    assert "revoked" in body["detail"]


def cli(api: SecuredApi, tmp_path: Path, *argv: str) -> int:
    config = tmp_path / "cloud.yaml"
    config.write_text(
        f"database: {{url: '{api.settings.database.url}'}}\nkeys_dir: '{api.keys_dir}'\n",
        encoding="utf-8",
    )
    return cli_main(["--config", str(config), *argv])


async def test_api_keys(
    api: SecuredApi, tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    assert cli(api, tmp_path, "apikeys", "create", "--name", "mes", "--sites", "site-a") == 0
    key = capsys.readouterr().out.strip()
    prefix = key.split("_")[1]
    with psycopg.connect(pg_url) as conn:
        stored = conn.execute(
            "SELECT secret_hash FROM ops.api_keys WHERE prefix = %s", (prefix,)
        ).fetchone()
    assert stored is not None and key.split("_", 2)[2] not in stored[0]
    assert (await get(api, OEE_A, {"X-API-Key": key})).status_code == 200
    assert (await get(api, OEE_A, {"Authorization": f"Bearer {key}"})).status_code == 200
    assert_problem(await get(api, OEE_B, {"X-API-Key": key}), 404)  # not its site
    # A wrong secret under the right prefix.
    assert_problem(await get(api, OEE_A, {"X-API-Key": key[:-4] + "AAAA"}), 401)
    # The `read` scope does not allow writes, whatever the role.
    async with api.client() as client:
        r = await client.post(
            "/v1/equipment/press-a/annotations",
            json={
                "site": "site-a",
                "ts": "2026-01-05T06:10:00Z",
                "kind": "downtime",
                "reason": "x",
            },
            headers={"X-API-Key": key},
        )
    assert_problem(r, 403)
    assert cli(api, tmp_path, "apikeys", "list") == 0
    listing = capsys.readouterr().out
    assert prefix in listing and "active" in listing and key not in listing
    assert cli(api, tmp_path, "apikeys", "revoke", prefix) == 0
    body = assert_problem(await get(api, OEE_A, {"X-API-Key": key}), 401)
    assert "revoked" in body["detail"]
    with psycopg.connect(pg_url) as conn:
        actions = [
            r[0] for r in conn.execute("SELECT action FROM audit.records ORDER BY id").fetchall()
        ]
        details = json.dumps(
            [r[0] for r in conn.execute("SELECT detail FROM audit.records").fetchall()]
        )
    assert actions == ["apikeys.create", "apikeys.revoke"]
    assert key.split("_", 2)[2] not in details


async def test_expired_api_key(api: SecuredApi, tmp_path: Path, pg_url: str,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert cli(api, tmp_path, "apikeys", "create", "--name", "t", "--sites", "*") == 0
    key = capsys.readouterr().out.strip()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE ops.api_keys SET expires_at = now() - interval '1 minute'")
    body = assert_problem(await get(api, OEE_A, {"X-API-Key": key}), 401)
    assert "expired" in body["detail"]


async def test_cli_token_issue_is_audited(
    api: SecuredApi, tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    argv = ("tokens", "issue", "--role", "engineer", "--sites", "site-a,site-b", "--ttl", "30d")
    assert cli(api, tmp_path, *argv) == 0
    token = capsys.readouterr().out.strip()
    decoded = jwt.decode(token, options={"verify_signature": False})
    assert decoded["exp"] - decoded["iat"] == 30 * 86400
    assert (await get(api, OEE_B, {"Authorization": f"Bearer {token}"})).status_code == 200
    assert cli(api, tmp_path, "tokens", "revoke", decoded["jti"], "--reason", "left") == 0
    assert_problem(await get(api, OEE_B, {"Authorization": f"Bearer {token}"}), 401)
    assert cli(api, tmp_path, "tokens", "rotate-key") == 0
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT action, target, detail FROM audit.records ORDER BY id"
        ).fetchall()
    assert [r[0] for r in rows] == ["tokens.issue", "tokens.revoke", "tokens.rotate_key"]
    assert rows[0][1] == decoded["jti"] and rows[0][2]["sites"] == ["site-a", "site-b"]
    assert token not in json.dumps([r[2] for r in rows])
    # Lifetimes beyond the configured maximum are refused.
    assert cli(api, tmp_path, "tokens", "issue", "--role", "admin", "--sites", "*",
               "--ttl", "400d") == 2  # fmt: skip


# --- an external identity provider, verified through its JWKS -------------------------------


@pytest.fixture
def idp() -> Iterator[tuple[str, ec.EllipticCurvePrivateKey, list[str]]]:
    """A JWKS document served by a local HTTP server (the identity provider's key endpoint),
    with the paths of the fetches it served."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    document = json.dumps({"keys": [{**jwk, "kid": "idp-1", "use": "sig", "alg": "ES256"}]})
    fetches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            body = document.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json", key, fetches
    server.shutdown()
    server.server_close()


async def test_external_idp_via_jwks(
    pg_url: str,
    pool: ConnectionPool,
    tmp_path: Path,
    idp: tuple[str, ec.EllipticCurvePrivateKey, list[str]],
) -> None:
    url, key, _ = idp
    seed_two_sites(pg_url)
    jwks = JwksSettings(
        url=url, issuer="https://idp.example", audience="gateway", role_claim="gw_role"
    )
    api = secured_api(pg_url, pool, tmp_path, jwks=jwks)
    now = int(datetime.now(UTC).timestamp())
    good = {
        "iss": "https://idp.example",
        "aud": "gateway",
        "sub": "alice@example",
        "gw_role": "viewer",
        "sites": ["site-a"],
        "iat": now,
        "exp": now + 600,
    }
    token = jwt.encode(good, key, algorithm="ES256", headers={"kid": "idp-1"})
    assert (await get(api, OEE_A, {"Authorization": f"Bearer {token}"})).status_code == 200
    assert_problem(await get(api, OEE_B, {"Authorization": f"Bearer {token}"}), 404)
    # Signed by another key under the provider's key id.
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(good, other, algorithm="ES256", headers={"kid": "idp-1"})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {forged}"}), 401)
    # A key id the provider does not publish.
    unknown = jwt.encode(good, key, algorithm="ES256", headers={"kid": "idp-9"})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {unknown}"}), 401)
    # Wrong audience, and an algorithm the provider is not trusted for.
    wrong_aud = jwt.encode({**good, "aud": "x"}, key, algorithm="ES256", headers={"kid": "idp-1"})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {wrong_aud}"}), 401)
    hs = jwt.encode(good, "secret-secret-secret-secret-32by", algorithm="HS256",
                    headers={"kid": "idp-1"})  # fmt: skip
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {hs}"}), 401)
    # Without the role claim the token grants nothing.
    no_role = {k: v for k, v in good.items() if k != "gw_role"}
    bare = jwt.encode(no_role, key, algorithm="ES256", headers={"kid": "idp-1"})
    assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {bare}"}), 401)


async def test_unknown_key_ids_fetch_the_providers_keys_once_per_period(
    pg_url: str,
    pool: ConnectionPool,
    tmp_path: Path,
    idp: tuple[str, ec.EllipticCurvePrivateKey, list[str]],
) -> None:
    url, key, fetches = idp
    seed_two_sites(pg_url)
    jwks = JwksSettings(url=url, issuer="https://idp.example", audience="gateway")
    api = secured_api(
        pg_url,
        pool,
        tmp_path,
        jwks=jwks,
        auth_failures=FailureLimit(per_minute=10_000, burst=10_000),
    )
    now = int(datetime.now(UTC).timestamp())
    good: dict[str, Any] = {
        "iss": "https://idp.example", "aud": "gateway", "sub": "a", "role": "viewer",
        "sites": ["site-a"], "iat": now, "exp": now + 600,
    }  # fmt: skip
    ok = jwt.encode(good, key, algorithm="ES256", headers={"kid": "idp-1"})
    assert (await get(api, OEE_A, {"Authorization": f"Bearer {ok}"})).status_code == 200
    before = len(fetches)
    for i in range(100):
        made_up = jwt.encode(good, key, algorithm="ES256", headers={"kid": f"made-up-{i}"})
        assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {made_up}"}), 401)
    assert len(fetches) - before <= 1, len(fetches) - before
    # A provider's token living longer than the maximum is refused like our own.
    long_lived = jwt.encode(
        {**good, "exp": now + 400 * 86400}, key, algorithm="ES256", headers={"kid": "idp-1"}
    )
    body = assert_problem(await get(api, OEE_A, {"Authorization": f"Bearer {long_lived}"}), 401)
    assert "lifetime exceeds" in body["detail"]


async def test_answers_served_again_stay_within_the_callers_sites(api: SecuredApi) -> None:
    marks = api.app.state.data_marks
    marks.start()  # the change listener that lets closed-window answers be served again
    try:
        assert marks.connected.wait(20)
        query = {"scope": "equipment", "id": "press-b", **WINDOW}
        everyone = api.headers("service", ["*"])
        async with api.client() as client:
            first = await client.get("/v1/oee", params=query, headers=everyone)
            again = await client.get("/v1/oee", params=query, headers=everyone)
            assert first.status_code == again.status_code == 200, first.text
            assert 'cache;desc="hit"' in again.headers["server-timing"]
            assert again.content == first.content
            # The same URL for a caller of site-a only: not the answer remembered above.
            other = await client.get(
                "/v1/oee", params=query, headers=api.headers("viewer", ["site-a"])
            )
            assert_problem(other, 404)
            own = await client.get(
                "/v1/oee", params=query, headers=api.headers("viewer", ["site-b"])
            )
            assert own.status_code == 200 and own.json() == first.json()
    finally:
        marks.stop()
