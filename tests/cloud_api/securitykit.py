"""What the security tests share: an app over the test database with the cloud's keys in a
temporary directory, tokens for it, and two sites of data written as the migrating role."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from psycopg_pool import ConnectionPool

from cloud_api.access.auth import TokenKeyring, generate_token_key, issue_token, parse_role
from cloud_api.access.pii import generate_pii_key
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings, SecuritySettings

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
WINDOW = {"from": "2026-01-05T06:00:00Z", "to": "2026-01-05T07:00:00Z"}


@dataclass
class SecuredApi:
    app: FastAPI
    settings: CloudSettings
    keys_dir: Path

    def token(self, role: str = "viewer", sites: list[str] | None = None, **kw: Any) -> str:
        ring = TokenKeyring.load(self.keys_dir)
        token, _ = issue_token(
            ring,
            self.settings.security,
            subject=f"user-{role}",
            role=parse_role(role),
            sites=sites or ["site-a"],
            ttl=kw.pop("ttl", timedelta(hours=1)),
            **kw,
        )
        return token

    def headers(self, role: str = "viewer", sites: list[str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sites)}"}

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://api",
        )


def secured_api(pg_url: str, pool: ConnectionPool, tmp_path: Path, **security: Any) -> SecuredApi:
    keys_dir = tmp_path / "cloud-keys"
    generate_token_key(keys_dir)
    generate_pii_key(keys_dir)
    settings = CloudSettings(
        database=DatabaseSettings(url=pg_url),
        keys_dir=keys_dir,
        security=SecuritySettings(**security),
    )
    return SecuredApi(create_app(settings, pool=pool), settings, keys_dir)


def seed_two_sites(url: str) -> None:
    """site-a has press-a, site-b has press-b, each with one minute of rollup data."""
    with psycopg.connect(url) as conn, conn.transaction():
        for site, equipment in (("site-a", "press-a"), ("site-b", "press-b")):
            conn.execute("INSERT INTO registry.sites(site_id) VALUES (%s)", (site,))
            conn.execute(
                "INSERT INTO registry.equipment(site_id, equipment_id) VALUES (%s, %s)",
                (site, equipment),
            )
            conn.execute(
                "INSERT INTO rollups.oee_1m(site_id, equipment_id, bucket, planned_busy_s, "
                "production_s, produced, good, ideal_produced_s, ideal_good_s) "
                "VALUES (%s, %s, %s, 60, 50, 10, 9, 40, 36)",
                (site, equipment, T0),
            )
            conn.execute(
                "INSERT INTO rollups.oee_1h(site_id, equipment_id, bucket, planned_busy_s, "
                "production_s, produced, good, ideal_produced_s, ideal_good_s) "
                "VALUES (%s, %s, %s, 60, 50, 10, 9, 40, 36)",
                (site, equipment, T0),
            )
