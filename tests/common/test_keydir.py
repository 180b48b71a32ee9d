"""Key directories: 0700 folders, 0600 private files, rings with a current pointer, for every
key kind (envelope and ack keys, token keys, personal-data keys)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloud_api.access.auth import TokenKeyring, generate_token_key
from cloud_api.access.pii import PiiKeyring, generate_pii_key
from common.keydir import (
    KeyFileError,
    ensure_directory,
    load_ring,
    read_lines,
    read_one_current,
    read_private,
    write_private_line,
)
from sync.keys import CloudKeyring, generate_agent_signing_key, generate_cloud_ack_key
from sync.keys import KeyFileError as SyncKeyFileError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> object:
    import os

    old = os.umask(0o002)
    yield None
    os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_every_key_kind_creates_its_folders_0700_and_private_files_0600(tmp_path: Path) -> None:
    made = {
        "agent": (tmp_path / "agent" / "keys", generate_agent_signing_key, "signing.key"),
        "ack": (tmp_path / "cloud" / "ack", generate_cloud_ack_key, None),
        "jwt": (tmp_path / "cloud" / "jwt", generate_token_key, None),
        "pii": (tmp_path / "cloud" / "pii", generate_pii_key, None),
    }
    for kind, (folder, generate, _) in made.items():
        generate(folder)
        assert mode(folder) == 0o700, kind
        assert mode(folder.parent) == 0o700, kind  # a missing parent too
        private = [p for p in folder.iterdir() if p.suffix == ".key"]
        assert private, kind
        assert {mode(p) for p in private} == {0o600}, kind
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    ensure_directory(existing)
    assert mode(existing) == 0o755  # an existing folder keeps its mode


def test_one_error_for_every_key_file(tmp_path: Path) -> None:
    assert SyncKeyFileError is KeyFileError
    write_private_line(tmp_path / "x.key", "secret")
    (tmp_path / "x.key").chmod(0o640)
    with pytest.raises(KeyFileError, match=f"{tmp_path / 'x.key'} is accessible"):
        read_private(tmp_path / "x.key")
    with pytest.raises(KeyFileError, match=f"cannot read {tmp_path / 'none.pub'}"):
        read_lines(tmp_path / "none.pub")
    with pytest.raises(KeyFileError, match="exists"):
        write_private_line(tmp_path / "x.key", "other")


def test_rings_name_where_they_looked(tmp_path: Path) -> None:
    kid = generate_token_key(tmp_path)
    ring = TokenKeyring.load(tmp_path)
    assert ring.current_id == kid
    (tmp_path / "jwt.current").write_text("0000\n")
    with pytest.raises(KeyFileError, match=rf"{tmp_path / 'jwt.current'} must name one key"):
        TokenKeyring.load(tmp_path)
    (tmp_path / f"jwt-{kid}.key").rename(tmp_path / "jwt-ffff.key")
    with pytest.raises(KeyFileError, match="its name must be"):
        TokenKeyring.load(tmp_path)

    pii = tmp_path / "pii"
    assert PiiKeyring.load(pii).current_id is None  # nothing yet: no key, no error
    pii_kid = generate_pii_key(pii)
    ring_pii = PiiKeyring.load(pii)
    assert ring_pii.current_id == pii_kid
    assert ring_pii.open(*ring_pii.seal("Jane", b"row-1"), b"row-1") == "Jane"
    assert read_one_current(pii, "nothing", {}, required=False) is None
    assert load_ring(tmp_path / "missing", "pii", read_private) == {}

    cloud = tmp_path / "cloud"
    generate_cloud_ack_key(cloud)
    with pytest.raises(KeyFileError, match=rf"cannot read {cloud / 'hpke.current'}"):
        CloudKeyring.load(cloud)
