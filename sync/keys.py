"""Key material of the edge<->cloud contract: generation, key ids, key files and keyrings.

Key id: the first 16 hex chars of sha256 over the raw public key bytes (for the hybrid KEM the
raw public key is the ML-KEM-768 public key followed by the X25519 public key).

Every key, public or private, is stored and exchanged as ONE text line ``<type>:<base64>``:

    ed25519:<32 raw bytes>                  agent signing / cloud ack-verify public key
    x25519:<32 raw bytes>                   cloud HPKE public key, suite x25519-...
    mlkem768x25519:<1184 + 32 raw bytes>    cloud HPKE public key, suite mlkem768x25519-...
    ed25519-private:<32 raw bytes>
    x25519-private:<32 raw bytes>
    mlkem768x25519-private:<64-byte ML-KEM seed + 32 X25519 bytes>

(PEM has no encoding for the hybrid key, so one format is used for all.) Key files follow the
rules of `common.keydir`: private ones written atomically with mode 0600 and refused on load
if group/other have any access, directories created 0700.

Cloud key directory (``CloudKeyring``), several keys kept for rotation:

    hpke-<keyid>.key  hpke-<keyid>.pub  hpke.current   (current key ids used by agents: one
                                                        line per suite, the first the default)
    ack-<keyid>.key   ack-<keyid>.pub   ack.current    (current = key signing new acks)

Agent key directory (``AgentKeys``):

    signing.key  signing.pub   the agent's Ed25519 key (the .pub line goes to the fleet registry)
    signing-retired.pub        public lines of signing keys replaced by `rotate_agent_signing_key`
    cloud-hpke.pub             the cloud's current HPKE public key lines (one per suite)
    cloud-ack.pub              one ed25519 line per accepted cloud ack key (several while rotating)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import keydir
from common.keydir import (
    ensure_directory,
    load_ring,
    read_current,
    read_lines,
    read_one_current,
    read_private,
    store_current,
    write_private_line,
    write_public_lines,
)

Suite = Literal["x25519-hkdfsha256-aes256gcm", "mlkem768x25519-hkdfsha256-aes256gcm"]
SUITE_X25519: Suite = "x25519-hkdfsha256-aes256gcm"
SUITE_MLKEM768X25519: Suite = "mlkem768x25519-hkdfsha256-aes256gcm"
SUITES: tuple[Suite, ...] = (SUITE_X25519, SUITE_MLKEM768X25519)

HpkePublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
HpkePrivateKey = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey

_PUBLIC_PREFIX: dict[Suite, str] = {SUITE_X25519: "x25519", SUITE_MLKEM768X25519: "mlkem768x25519"}
_MLKEM_SEED, _MLKEM_PUB, _X25519_LEN = 64, 1184, 32

KeyFileError = keydir.KeyFileError  # the one error of every key file (common.keydir)


def key_id(raw_public: bytes) -> str:
    """Return the key id of a raw public key: first 16 hex chars of its sha256."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def ed25519_key_id(key: Ed25519PublicKey) -> str:
    return key_id(key.public_bytes_raw())


def ed25519_line(key: Ed25519PublicKey) -> str:
    """Export an Ed25519 public key as ``ed25519:<base64>``."""
    return _line("ed25519", key.public_bytes_raw())


@dataclass(frozen=True)
class CloudPublicKey:
    """The cloud's HPKE public key together with its suite and raw bytes (for the key id)."""

    suite: Suite
    key: HpkePublicKey = field(repr=False, compare=False)
    raw: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def to_line(self) -> str:
        return _line(_PUBLIC_PREFIX[self.suite], self.raw)


@dataclass(frozen=True)
class CloudPrivateKey:
    """The cloud's HPKE private key; ``raw`` is what the key file stores."""

    suite: Suite
    key: HpkePrivateKey = field(repr=False, compare=False)
    raw: bytes = field(repr=False)
    public: CloudPublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls, suite: Suite = SUITE_X25519) -> CloudPrivateKey:
        if suite == SUITE_X25519:
            return _x25519_private(x25519.X25519PrivateKey.generate().private_bytes_raw())
        if suite == SUITE_MLKEM768X25519:
            seed = mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
            return _hybrid_private(seed + x25519.X25519PrivateKey.generate().private_bytes_raw())
        raise ValueError(f"unknown suite {suite!r}")

    def to_line(self) -> str:
        return _line(_PUBLIC_PREFIX[self.suite] + "-private", self.raw)


def _x25519_private(raw: bytes) -> CloudPrivateKey:
    priv = x25519.X25519PrivateKey.from_private_bytes(raw)
    pub = priv.public_key()
    return CloudPrivateKey(
        SUITE_X25519, priv, raw, CloudPublicKey(SUITE_X25519, pub, pub.public_bytes_raw())
    )


def _hybrid_private(raw: bytes) -> CloudPrivateKey:
    if len(raw) != _MLKEM_SEED + _X25519_LEN:
        raise ValueError("hybrid private key must be 96 bytes")
    m = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM_SEED])
    x = x25519.X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED:])
    pub_raw = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
    public = CloudPublicKey(
        SUITE_MLKEM768X25519,
        hpke.MLKEM768X25519PublicKey(m.public_key(), x.public_key()),
        pub_raw,
    )
    return CloudPrivateKey(SUITE_MLKEM768X25519, hpke.MLKEM768X25519PrivateKey(m, x), raw, public)


# --- one-line text form ---------------------------------------------------------------------


def _line(kind: str, raw: bytes) -> str:
    return f"{kind}:{base64.b64encode(raw).decode('ascii')}"


def _split_line(line: str) -> tuple[str, bytes]:
    kind, sep, b64 = line.strip().partition(":")
    if not sep:
        raise KeyFileError("key line must look like '<type>:<base64>'")
    try:
        return kind, base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise KeyFileError(f"bad base64 in {kind} key line") from exc


def parse_ed25519_public(line: str) -> Ed25519PublicKey:
    """Parse ``ed25519:<base64>`` (agent signing key or cloud ack-verify key)."""
    kind, raw = _split_line(line)
    if kind != "ed25519" or len(raw) != 32:
        raise KeyFileError(f"expected an ed25519 public key line, got {kind!r}")
    return Ed25519PublicKey.from_public_bytes(raw)


def parse_cloud_public(line: str) -> CloudPublicKey:
    """Parse ``x25519:<base64>`` or ``mlkem768x25519:<base64>`` (the cloud HPKE public key)."""
    kind, raw = _split_line(line)
    try:
        if kind == "x25519" and len(raw) == _X25519_LEN:
            pub = x25519.X25519PublicKey.from_public_bytes(raw)
            return CloudPublicKey(SUITE_X25519, pub, raw)
        if kind == "mlkem768x25519" and len(raw) == _MLKEM_PUB + _X25519_LEN:
            m = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM_PUB])
            x = x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM_PUB:])
            return CloudPublicKey(SUITE_MLKEM768X25519, hpke.MLKEM768X25519PublicKey(m, x), raw)
    except ValueError as exc:
        raise KeyFileError(f"invalid {kind} public key") from exc
    raise KeyFileError(f"expected an x25519 or mlkem768x25519 public key line, got {kind!r}")


def parse_ed25519_private(line: str) -> Ed25519PrivateKey:
    kind, raw = _split_line(line)
    if kind != "ed25519-private" or len(raw) != 32:
        raise KeyFileError(f"expected an ed25519-private key line, got {kind!r}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def parse_cloud_private(line: str) -> CloudPrivateKey:
    kind, raw = _split_line(line)
    try:
        if kind == "x25519-private" and len(raw) == _X25519_LEN:
            return _x25519_private(raw)
        if kind == "mlkem768x25519-private":
            return _hybrid_private(raw)
    except ValueError as exc:
        raise KeyFileError(f"invalid {kind} private key") from exc
    raise KeyFileError(f"expected an HPKE private key line, got {kind!r}")


# --- files ----------------------------------------------------------------------------------


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key file (agent signing key or cloud ack key)."""
    return parse_ed25519_private(read_private(path))


def load_cloud_private(path: Path) -> CloudPrivateKey:
    return parse_cloud_private(read_private(path))


def load_ed25519_publics(path: Path) -> dict[str, Ed25519PublicKey]:
    """Load every ``ed25519:`` line of a file, keyed by key id."""
    keys = [parse_ed25519_public(ln) for ln in read_lines(path)]
    return {ed25519_key_id(k): k for k in keys}


def load_cloud_public(path: Path) -> CloudPublicKey:
    lines = read_lines(path)
    if len(lines) != 1:
        raise KeyFileError(f"{path} must hold exactly one HPKE public key line")
    return parse_cloud_public(lines[0])


def load_cloud_publics(path: Path) -> list[CloudPublicKey]:
    """One or more HPKE public key lines, at most one per suite (the first is the default)."""
    keys = [parse_cloud_public(ln) for ln in read_lines(path)]
    if not keys:
        raise KeyFileError(f"{path} holds no HPKE public key")
    suites = [k.suite for k in keys]
    if len(set(suites)) != len(suites):
        raise KeyFileError(f"{path} holds two HPKE keys of the same suite")
    return keys


# --- cloud keyring --------------------------------------------------------------------------


def generate_cloud_hpke_key(
    directory: Path, suite: Suite = SUITE_X25519, *, make_current: bool = True
) -> CloudPrivateKey:
    """Create ``hpke-<id>.key/.pub`` and (by default) point ``hpke.current`` at it."""
    key = CloudPrivateKey.generate(suite)
    _store_pair(
        directory,
        "hpke",
        key.key_id,
        key.to_line(),
        key.public.to_line(),
        make_current=make_current,
    )
    return key


def generate_cloud_ack_key(directory: Path, *, make_current: bool = True) -> Ed25519PrivateKey:
    """Create ``ack-<id>.key/.pub`` and (by default) point ``ack.current`` at it."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    private = _line("ed25519-private", key.private_bytes_raw())
    _store_pair(
        directory, "ack", ed25519_key_id(pub), private, ed25519_line(pub), make_current=make_current
    )
    return key


def _store_pair(
    directory: Path, prefix: str, kid: str, private: str, public: str, *, make_current: bool
) -> None:
    ensure_directory(directory)
    write_private_line(directory / f"{prefix}-{kid}.key", private)
    write_public_lines(directory / f"{prefix}-{kid}.pub", [public])
    if make_current:
        store_current(directory, prefix, [kid])


def generate_cloud_hpke_keys(
    directory: Path, suites: list[Suite], *, make_current: bool = True
) -> list[CloudPrivateKey]:
    """Create one HPKE key per suite; with make_current each replaces its suite's current key.

    ``hpke.current`` keeps one line per suite; the first is the default for agents that do not
    choose a suite, and a rotation keeps each suite in its place.
    """
    created = [generate_cloud_hpke_key(directory, suite, make_current=False) for suite in suites]
    if make_current:
        pointer = directory / "hpke.current"
        current: dict[Suite, str] = {}
        if pointer.exists():
            for kid in read_lines(pointer):
                current[load_cloud_private(directory / f"hpke-{kid}.key").suite] = kid
        for key in created:
            current[key.suite] = key.key_id  # in place when the suite exists, else appended
        write_public_lines(pointer, list(current.values()))
    return created


@dataclass(frozen=True)
class CloudKeyring:
    """All HPKE and ack-signing keys of a cloud key directory, by key id.

    Old keys stay so batches sealed to them (still in agents' outboxes) can be opened and
    acks signed by them can be verified; ``*.current`` names the key to use for new work.
    """

    hpke: dict[str, CloudPrivateKey]
    ack: dict[str, Ed25519PrivateKey]
    current_hpke_id: str
    current_ack_id: str
    current_hpke_ids: tuple[str, ...] = ()  # one per suite, the default first

    @classmethod
    def load(cls, directory: Path) -> CloudKeyring:
        hpke_keys = load_ring(directory, "hpke", load_cloud_private, lambda k: k.key_id)
        ack_keys = load_ring(
            directory, "ack", load_signing_key, lambda a: ed25519_key_id(a.public_key())
        )
        hpke_current = _current_per_suite(directory, hpke_keys)
        ack_current = read_one_current(directory, "ack", ack_keys)
        if ack_current is None:  # required: read_one_current raised otherwise
            raise KeyFileError(f"{directory}: no current ack key")
        return cls(hpke_keys, ack_keys, hpke_current[0], ack_current, tuple(hpke_current))

    @property
    def current_hpke_keys(self) -> list[CloudPrivateKey]:
        """The current key of every suite the cloud publishes, the default first."""
        return [self.hpke[kid] for kid in (self.current_hpke_ids or (self.current_hpke_id,))]

    @property
    def current_hpke(self) -> CloudPrivateKey:
        return self.hpke[self.current_hpke_id]

    @property
    def current_ack(self) -> tuple[str, Ed25519PrivateKey]:
        return self.current_ack_id, self.ack[self.current_ack_id]

    def decrypt_key_for(self, cloud_key_id: str) -> HpkePrivateKey | None:
        """Lookup shaped for ``open_envelope(decrypt_key_for=...)``."""
        k = self.hpke.get(cloud_key_id)
        return k.key if k is not None else None

    def ack_verify_keys(self) -> dict[str, Ed25519PublicKey]:
        return {kid: k.public_key() for kid, k in self.ack.items()}


def _current_per_suite(directory: Path, keys: Mapping[str, CloudPrivateKey]) -> list[str]:
    lines = read_current(directory, "hpke", keys)
    suites = [keys[kid].suite for kid in lines]
    if len(set(suites)) != len(suites):
        raise KeyFileError(f"{directory / 'hpke.current'} names two current keys of the same suite")
    return lines


# --- agent keys -----------------------------------------------------------------------------


def generate_agent_signing_key(directory: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create ``signing.key`` (0600) and ``signing.pub`` (the line for the fleet registry)."""
    ensure_directory(directory)
    key = Ed25519PrivateKey.generate()
    line = _line("ed25519-private", key.private_bytes_raw())
    write_private_line(directory / "signing.key", line, overwrite=overwrite)
    write_public_lines(directory / "signing.pub", [ed25519_line(key.public_key())])
    return key


def rotate_agent_signing_key(directory: Path) -> tuple[Ed25519PrivateKey, str]:
    """Replace the agent's signing key; returns (new key, retired key id).

    Batches already in the outbox stay signed by the retired key (they are sealed once), so
    the cloud must keep that key enrolled until they are acked; its public line is kept in
    ``signing-retired.pub`` for that. The retired private key is not kept: nothing needs it.
    """
    old = load_signing_key(directory / "signing.key")
    old_line = ed25519_line(old.public_key())
    retired_path = directory / "signing-retired.pub"
    retired = read_lines(retired_path) if retired_path.exists() else []
    if old_line not in retired:
        write_public_lines(retired_path, [*retired, old_line])
    new = generate_agent_signing_key(directory, overwrite=True)
    return new, ed25519_key_id(old.public_key())


def retired_signing_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    path = directory / "signing-retired.pub"
    return load_ed25519_publics(path) if path.exists() else {}


def install_cloud_public_keys(
    directory: Path, hpke_line: str | list[str], ack_lines: list[str]
) -> None:
    """Write the operator-pasted cloud key lines after checking that they parse.

    ``hpke_line`` is one line or one line per suite (the first is the default).
    """
    hpke_lines = [hpke_line] if isinstance(hpke_line, str) else list(hpke_line)
    suites = [parse_cloud_public(ln).suite for ln in hpke_lines]
    if not suites or len(set(suites)) != len(suites):
        raise KeyFileError("expected one HPKE public key line per suite")
    for ln in ack_lines:
        parse_ed25519_public(ln)
    ensure_directory(directory)
    write_public_lines(directory / "cloud-hpke.pub", [ln.strip() for ln in hpke_lines])
    write_public_lines(directory / "cloud-ack.pub", [ln.strip() for ln in ack_lines])


@dataclass(frozen=True)
class AgentKeys:
    """What the edge needs: its signing key, the cloud's HPKE key and the cloud ack keys."""

    signing_key: Ed25519PrivateKey = field(repr=False)
    cloud_public: CloudPublicKey  # the default (first) HPKE key
    ack_verify_keys: dict[str, Ed25519PublicKey] = field(repr=False)
    cloud_publics: tuple[CloudPublicKey, ...] = ()  # one per suite the cloud published

    @property
    def signing_key_id(self) -> str:
        return ed25519_key_id(self.signing_key.public_key())

    def cloud_key_for(self, suite: Suite | None) -> CloudPublicKey:
        """The cloud's HPKE key for `suite` (None: the default); KeyFileError if not installed."""
        if suite is None:
            return self.cloud_public
        for key in self.cloud_publics or (self.cloud_public,):
            if key.suite == suite:
                return key
        raise KeyFileError(
            f"no cloud HPKE key for suite {suite} is installed; ask the cloud operator for "
            f"`cloud-api keys init --rotate --suite {suite}` and run `edge-agent keys "
            "install-cloud` with the new export"
        )

    @classmethod
    def load(cls, directory: Path) -> AgentKeys:
        acks = load_ed25519_publics(directory / "cloud-ack.pub")
        if not acks:
            raise KeyFileError(f"{directory / 'cloud-ack.pub'} holds no ack key")
        clouds = load_cloud_publics(directory / "cloud-hpke.pub")
        return cls(
            load_signing_key(directory / "signing.key"),
            clouds[0],
            acks,
            tuple(clouds),
        )
