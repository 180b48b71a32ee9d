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

from sync.keys import KeyFileError, write_private_line, write_public_lines

_NONCE = 12
_PREFIX = "aes256gcm"


class PiiError(Exception):
    """Personal data cannot be sealed or opened (no key, unknown key id, tampered value)."""


def _parse(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{path} is accessible by group/other; chmod 600 it")
        kind, _, b64 = path.read_text(encoding="ascii").strip().partition(":")
        raw = base64.b64decode(b64, validate=True)
    except (OSError, UnicodeDecodeError, binascii.Error) as exc:
        raise KeyFileError(f"cannot read {path}: {type(exc).__name__}") from None
    if kind != _PREFIX or len(raw) != 32:
        raise KeyFileError(f"{path} must hold one '{_PREFIX}:<base64 of 32 bytes>' line")
    return raw


def generate_pii_key(directory: Path) -> str:
    """Create a new AES-256 key and make it current; returns its key id."""
    directory.mkdir(parents=True, exist_ok=True)
    kid = secrets.token_hex(8)
    raw = AESGCM.generate_key(bit_length=256)
    write_private_line(directory / f"pii-{kid}.key", f"{_PREFIX}:{base64.b64encode(raw).decode()}")
    write_public_lines(directory / "pii.current", [kid])
    return kid


@dataclass(frozen=True)
class PiiKeyring:
    keys: dict[str, AESGCM] = field(repr=False)
    current_id: str | None

    @classmethod
    def load(cls, directory: Path) -> PiiKeyring:
        keys: dict[str, AESGCM] = {}
        if directory.is_dir():
            for path in sorted(directory.glob("pii-*.key")):
                keys[path.name[len("pii-") : -len(".key")]] = AESGCM(_parse(path))
        pointer = directory / "pii.current"
        current = pointer.read_text(encoding="ascii").strip() if pointer.exists() else None
        if current is not None and current not in keys:
            raise KeyFileError(f"{pointer} must name a key present in {directory}")
        return cls(keys, current)

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
