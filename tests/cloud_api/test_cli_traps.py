"""`cloud-api` without traps: no default database, every database command names the one it
uses (never the password), and commands that need keys do not create a keys folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_api.cli import main
from sync.keys import generate_agent_signing_key
from tests.conftest import PG_ADMIN

DATABASE_COMMANDS = [
    ["migrate"],
    ["retention", "--keep-months", "3"],
    ["agents", "revoke-key", "--agent", "a", "--key-id", "k"],
    ["tokens", "revoke", "some-jti"],
    ["tokens", "rotate-key"],
    ["apikeys", "list"],
    ["pii", "rotate-key"],
    ["audit", "list"],
    ["serve", "--port", "1"],
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CLOUD_* settings from the machine; returns the keys folder the commands get."""
    for name in ("CLOUD_DATABASE_URL", "CLOUD_DATABASE_LISTEN_URL", "CLOUD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    keys = tmp_path / "keys"
    monkeypatch.setenv("CLOUD_KEYS_DIR", str(keys))
    return keys


@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_command_without_a_database_says_so_and_touches_nothing(
    argv: list[str], clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "no database given: set CLOUD_DATABASE_URL" in captured.err
    assert "database.url" in captured.err
    assert captured.out == ""
    assert not clean_env.exists(), "no key may be made for a command that did not run"


def test_database_commands_name_the_database_and_never_the_password(
    pg_url: str,
    clean_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = pg_url.rsplit("/", 1)[1]
    host_port = PG_ADMIN.rsplit("@", 1)[1]
    # The machine's PostgreSQL trusts local connections, so the password is not checked;
    # it is there to show that no message repeats it.
    with_password = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    assert with_password != pg_url
    monkeypatch.setenv("CLOUD_DATABASE_URL", with_password)
    public = tmp_path / "agent"
    generate_agent_signing_key(public)
    commands = [
        ["migrate"],
        ["agents", "enroll", "--agent", "a-1", "--site", "s-1", "--public-key",
         str(public / "signing.pub")],
        ["tokens", "rotate-key"],
        ["tokens", "issue", "--role", "viewer", "--sites", "s-1"],
        ["apikeys", "list"],
        ["audit", "list"],
    ]  # fmt: skip
    for argv in commands:
        assert main(argv) == 0, argv
        captured = capsys.readouterr()
        said = captured.err + captured.out
        assert f"database {name} on {host_port}" in said, (argv, said)
        assert "s3cret" not in said


def test_tokens_issue_does_not_create_keys_and_says_where_it_looked(
    pg_url: str,
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CLOUD_DATABASE_URL", pg_url)
    argv = ["tokens", "issue", "--role", "viewer", "--sites", "s-1"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no current token signing key in {clean_env}" in captured.err
    assert "does not exist" in captured.err and "cloud-api tokens rotate-key" in captured.err
    assert not clean_env.exists()
    # An empty folder (the cloud's HPKE keys only, say) is no token key either.
    clean_env.mkdir()
    assert main(argv) == 2
    assert "no jwt-*.key there" in capsys.readouterr().err
    assert list(clean_env.iterdir()) == []
    # Creating the key is its own command; then issue works.
    assert main(["tokens", "rotate-key"]) == 0
    assert str(clean_env) in capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out.count(".") == 2  # one JWT
