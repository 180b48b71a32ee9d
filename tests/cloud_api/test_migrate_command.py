"""`cloud-api migrate` on the machine's PostgreSQL: it names the database it migrated, and
says how to create one that does not exist."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from psycopg import sql

from cloud_api.cli import main
from tests.conftest import PG_ADMIN


def test_migrate_names_the_database_and_how_to_create_a_missing_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"t_{secrets.token_hex(6)}"
    host_port = PG_ADMIN.rsplit("@", 1)[-1]
    monkeypatch.setenv("CLOUD_DATABASE_URL", f"{PG_ADMIN}/{name}")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"database {name} on {host_port} does not exist" in err
    assert f"`createdb {name}`" in err and f'CREATE DATABASE "{name}";' in err
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        assert main(["migrate"]) == 0
        assert capsys.readouterr().out.startswith(f"database {name} on {host_port}: applied ")
        assert main(["migrate"]) == 0
        assert capsys.readouterr().out == f"database {name} on {host_port} is up to date\n"
    finally:
        with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
