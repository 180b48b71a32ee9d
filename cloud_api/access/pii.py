"""Personal data at rest: operator identities sealed with AES-256-GCM under a key id.

Keys live in the cloud key directory as ``pii-<kid>.key`` (0600, one line
``aes256gcm:<base64 of 32 bytes>``) with ``pii.current`` naming the key for new data; old keys
stay for reading what they sealed (rotation). A sealed value is ``nonce(12) || ciphertext+tag``
and its key id is stored beside it. The nonce is random per value (never a counter), and the
associated data binds the value to its row (site, equipment, annotation id), so a ciphertext
copied onto another row does not open.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.keydir import (
    KeyFileError,
    ensure_directory,
    load_ring,
    read_one_current,
    read_private,
    store_current,
    write_private_line,
)

_NONCE = 12
_PREFIX = "aes256gcm"


class PiiError(Exception):
    """Personal data cannot be sealed or opened (no key, unknown key id, tampered value)."""


def _parse(path: Path) -> bytes:
    kind, _, b64 = read_private(path).strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise KeyFileError(f"cannot read {path}: {type(exc).__name__}") from None
    if kind != _PREFIX or len(raw) != 32:
        raise KeyFileError(f"{path} must hold one '{_PREFIX}:<base64 of 32 bytes>' line")
    return raw


def generate_pii_key(directory: Path) -> str:
    """Create a new AES-256 key and make it current; returns its key id."""
    ensure_directory(directory)
    kid = secrets.token_hex(8)
    raw = AESGCM.generate_key(bit_length=256)
    write_private_line(directory / f"pii-{kid}.key", f"{_PREFIX}:{base64.b64encode(raw).decode()}")
    store_current(directory, "pii", [kid])
    return kid


@dataclass(frozen=True)
class PiiKeyring:
    keys: dict[str, AESGCM] = field(repr=False)
    current_id: str | None

    @classmethod
    def load(cls, directory: Path) -> PiiKeyring:
        keys = load_ring(directory, "pii", lambda path: AESGCM(_parse(path)))
        return cls(keys, read_one_current(directory, "pii", keys, required=False))

    def seal(self, value: str, aad: bytes) -> tuple[str, bytes]:
        if self.current_id is None:
            raise PiiError("no personal-data key: run `cloud-api pii rotate-key`")
        nonce = os.urandom(_NONCE)
        sealed = self.keys[self.current_id].encrypt(nonce, value.encode("utf-8"), aad)
        return self.current_id, nonce + sealed

    def open(self, key_id: str, sealed: bytes, aad: bytes) -> str:
        key = self.keys.get(key_id)
        if key is None:
            raise PiiError(f"personal-data key {key_id} is not in the key directory")
        try:
            return key.decrypt(sealed[:_NONCE], sealed[_NONCE:], aad).decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise PiiError("a sealed value does not open (tampered or moved)") from None
