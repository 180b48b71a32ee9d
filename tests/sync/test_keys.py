"""Key ids, one-line key text, key files (mode 0600, atomic, no overwrite) and keyrings."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync.envelope import AckBody, EnvelopeHeader, open_envelope, seal, sign_ack, verify_ack
from sync.keys import (
    SUITE_MLKEM768X25519,
    SUITE_X25519,
    SUITES,
    AgentKeys,
    CloudKeyring,
    CloudPrivateKey,
    KeyFileError,
    Suite,
    ed25519_key_id,
    ed25519_line,
    generate_agent_signing_key,
    generate_cloud_ack_key,
    generate_cloud_hpke_key,
    install_cloud_public_keys,
    key_id,
    load_signing_key,
    parse_cloud_private,
    parse_cloud_public,
    parse_ed25519_public,
)


@pytest.fixture
def open_umask() -> Iterator[None]:
    # a permissive umask must not leak into private key modes
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    raw = pub.public_bytes_raw()
    assert ed25519_key_id(pub) == key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]


@pytest.mark.parametrize("suite", SUITES)
def test_cloud_key_lines_round_trip(suite: Suite) -> None:
    key = CloudPrivateKey.generate(suite)
    line = key.public.to_line()
    assert line.startswith(
        {SUITE_X25519: "x25519:", SUITE_MLKEM768X25519: "mlkem768x25519:"}[suite]
    )
    assert "\n" not in line
    pub = parse_cloud_public(line)
    assert (pub.suite, pub.raw, pub.key_id) == (suite, key.public.raw, key.key_id)
    again = parse_cloud_private(key.to_line())
    assert again.key_id == key.key_id and again.raw == key.raw
    if suite == SUITE_MLKEM768X25519:
        assert len(pub.raw) == 1184 + 32


def test_ed25519_line_round_trip() -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    line = ed25519_line(pub)
    assert line.startswith("ed25519:")
    assert parse_ed25519_public(f"  {line}\n") == pub


@pytest.mark.parametrize(
    "line",
    ["", "ed25519", "ed25519:!!!", "ed25519:AAAA", "rsa:AAAA", "x25519:" + "A" * 44],
)
def test_bad_public_lines(line: str) -> None:
    with pytest.raises(KeyFileError):
        parse_ed25519_public(line)
    with pytest.raises(KeyFileError):
        parse_cloud_public(line.replace("x25519:" + "A" * 44, "mlkem768x25519:AAAA"))


@pytest.mark.usefixtures("open_umask")
def test_agent_signing_key_file(tmp_path: Path) -> None:
    key = generate_agent_signing_key(tmp_path)
    assert mode(tmp_path / "signing.key") == 0o600
    assert mode(tmp_path / "signing.pub") == 0o644
    assert load_signing_key(tmp_path / "signing.key").private_bytes_raw() == key.private_bytes_raw()
    pub_line = (tmp_path / "signing.pub").read_text().strip()
    assert parse_ed25519_public(pub_line) == key.public_key()
    assert "private" not in pub_line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key", "signing.pub"]


def test_private_key_is_never_overwritten_by_default(tmp_path: Path) -> None:
    first = generate_agent_signing_key(tmp_path)
    with pytest.raises(KeyFileError, match="overwrite"):
        generate_agent_signing_key(tmp_path)
    kept = load_signing_key(tmp_path / "signing.key")
    assert kept.private_bytes_raw() == first.private_bytes_raw()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key", "signing.pub"]
    second = generate_agent_signing_key(tmp_path, overwrite=True)
    assert load_signing_key(tmp_path / "signing.key").private_bytes_raw() == (
        second.private_bytes_raw()
    )
    assert mode(tmp_path / "signing.key") == 0o600


def test_loose_private_key_permissions_are_refused(tmp_path: Path) -> None:
    generate_agent_signing_key(tmp_path)
    (tmp_path / "signing.key").chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(tmp_path / "signing.key")


@pytest.mark.usefixtures("open_umask")
def test_cloud_key_files_and_modes(tmp_path: Path) -> None:
    hk = generate_cloud_hpke_key(tmp_path, SUITE_MLKEM768X25519)
    ak = generate_cloud_ack_key(tmp_path)
    aid = ed25519_key_id(ak.public_key())
    assert mode(tmp_path / f"hpke-{hk.key_id}.key") == 0o600
    assert mode(tmp_path / f"ack-{aid}.key") == 0o600
    assert (tmp_path / "hpke.current").read_text().strip() == hk.key_id
    assert (tmp_path / "ack.current").read_text().strip() == aid
    pub = parse_cloud_public((tmp_path / f"hpke-{hk.key_id}.pub").read_text())
    assert pub.key_id == hk.key_id


def _batch(agent: AgentKeys, seq: int) -> bytes:
    h = EnvelopeHeader(
        agent_id="agent-1",
        site_id="site-a",
        epoch="e1",
        seq=seq,
        count=1,
        signing_key_id=agent.signing_key_id,
        cloud_key_id=agent.cloud_public.key_id,
        suite=agent.cloud_public.suite,
    )
    return seal(f"batch {seq}".encode(), h, agent.signing_key, agent.cloud_public)


def test_rotation_old_batches_still_open_and_old_acks_still_verify(tmp_path: Path) -> None:
    cloud, edge = tmp_path / "cloud", tmp_path / "edge"
    old_hpke = generate_cloud_hpke_key(cloud, SUITE_X25519)
    old_ack = generate_cloud_ack_key(cloud)
    signing = generate_agent_signing_key(edge)
    install_cloud_public_keys(edge, old_hpke.public.to_line(), [ed25519_line(old_ack.public_key())])
    agent = AgentKeys.load(edge)
    assert agent.signing_key_id == ed25519_key_id(signing.public_key())
    old_batch = _batch(agent, 1)  # still in the outbox when the cloud rotates

    new_hpke = generate_cloud_hpke_key(cloud, SUITE_MLKEM768X25519)
    new_ack = generate_cloud_ack_key(cloud)
    ring = CloudKeyring.load(cloud)
    assert ring.current_hpke.key_id == new_hpke.key_id != old_hpke.key_id
    assert ring.current_ack[0] == ed25519_key_id(new_ack.public_key())
    assert set(ring.hpke) == {old_hpke.key_id, new_hpke.key_id}

    install_cloud_public_keys(
        edge,
        ring.current_hpke.public.to_line(),
        [ed25519_line(k) for k in ring.ack_verify_keys().values()],
    )
    agent = AgentKeys.load(edge)
    assert agent.cloud_public.suite == SUITE_MLKEM768X25519
    new_batch = _batch(agent, 2)

    for raw, text in ((old_batch, b"batch 1"), (new_batch, b"batch 2")):
        opened = open_envelope(
            raw,
            verify_key_for=lambda a, k: signing.public_key() if k == agent.signing_key_id else None,
            decrypt_key_for=ring.decrypt_key_for,
        )
        assert opened.plaintext == text
    assert ring.decrypt_key_for("0" * 16) is None

    # an ack signed by the old key (issued before the switch) still verifies on the edge
    old_ack_id = ed25519_key_id(old_ack.public_key())
    ack = AckBody(agent_id="agent-1", epoch="e1", ranges=[(1, 1)], digests={}, key_id=old_ack_id)
    got = verify_ack(sign_ack(ack, old_ack), verify_keys=agent.ack_verify_keys, agent_id="agent-1")
    assert got.covers(1)


def test_keyring_rejects_inconsistent_directories(tmp_path: Path) -> None:
    key = generate_cloud_hpke_key(tmp_path)
    generate_cloud_ack_key(tmp_path)
    (tmp_path / "hpke.current").write_text("ffffffffffffffff\n")
    with pytest.raises(KeyFileError, match=r"hpke\.current"):
        CloudKeyring.load(tmp_path)
    (tmp_path / "hpke.current").write_text(key.key_id + "\n")
    assert CloudKeyring.load(tmp_path).current_hpke_id == key.key_id
    (tmp_path / f"hpke-{key.key_id}.key").rename(tmp_path / "hpke-0000000000000000.key")
    with pytest.raises(KeyFileError, match="its name must be"):
        CloudKeyring.load(tmp_path)


def test_install_rejects_bad_lines_and_agent_keys_need_ack_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        install_cloud_public_keys(tmp_path, "ed25519:AAAA", [])
    assert not (tmp_path / "cloud-hpke.pub").exists()
    generate_agent_signing_key(tmp_path)
    install_cloud_public_keys(tmp_path, CloudPrivateKey.generate().public.to_line(), [])
    with pytest.raises(KeyFileError, match="no ack key"):
        AgentKeys.load(tmp_path)
