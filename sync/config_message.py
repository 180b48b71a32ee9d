"""Signed remote configuration: the message the cloud publishes to one agent's config topic.

JSON ``{"config": {...}, "sig": base64}``, published retained (QoS 1) on
``{prefix}edge/{site}/{agent}/v1/config``. The body names the agent, the version number, the
sha256 digest of the YAML text and carries the text itself; ``serial`` counts the cloud's
publications to this agent (every push and every rollback takes the next one), and
``rollback`` is null, or the version number itself when the cloud deliberately makes an
earlier version current again. The Ed25519 signature, by the cloud's current ack-signing key
(the key agents already trust for acks), covers ``CONFIG_CONTEXT`` + the canonical body, so
it can never be taken for an ack or a rejection.

The YAML text travels as written: ``${ENV}`` references stay references and are resolved on
the box. Pure code: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.envelope import _canonical, _check_id, _check_int, _check_utc, utc_now_iso
from sync.keys import ed25519_key_id

CONFIG_CONTEXT = b"EGW1 config\n"
# A configuration file of a large plant is a few hundred kilobytes at most.
MAX_CONFIG_TEXT = 1024 * 1024
MAX_CONFIG_MESSAGE = 2 * MAX_CONFIG_TEXT
_MAX_VERSION = 2**31 - 1
_COMMENT_MAX = 500

ConfigReason = Literal["malformed", "unknown_key", "bad_signature", "wrong_agent", "bad_digest"]


def config_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}edge/{site}/{agent}/v1/config"


def config_digest(text: str) -> str:
    """sha256 hex of the YAML text as UTF-8: what the signature binds the content by."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ConfigMessageError(Exception):
    """A configuration message was refused; ``reason`` is a stable label."""

    def __init__(self, reason: ConfigReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: ConfigReason = reason
        self.detail = detail


@dataclass(frozen=True)
class ConfigBody:
    """One published configuration version of one agent."""

    agent_id: str
    site_id: str
    version: int
    serial: int
    digest: str
    yaml: str = field(repr=False)
    key_id: str
    rollback: int | None = None
    comment: str = ""
    issued: str = field(default_factory=utc_now_iso)
    message_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        for name in ("agent_id", "site_id", "key_id", "message_id"):
            _check_id(name, getattr(self, name))
        _check_utc("issued", self.issued)
        _check_int("version", self.version, _MAX_VERSION)
        _check_int("serial", self.serial, _MAX_VERSION)
        if self.version < 1 or self.serial < 1:
            raise ValueError("version and serial start at 1")
        if self.rollback is not None:
            _check_int("rollback", self.rollback, _MAX_VERSION)
            if self.rollback != self.version:
                raise ValueError("rollback must name the version it makes current")
        if not isinstance(self.yaml, str) or len(self.yaml) > MAX_CONFIG_TEXT:
            raise ValueError(f"yaml must be a string of at most {MAX_CONFIG_TEXT} characters")
        if not isinstance(self.comment, str) or len(self.comment) > _COMMENT_MAX:
            raise ValueError(f"comment must be a string of at most {_COMMENT_MAX} characters")
        if not isinstance(self.digest, str) or self.digest != config_digest(self.yaml):
            raise ValueError("digest is not the sha256 of the yaml text")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONFIG_FIELDS}


_CONFIG_FIELDS = frozenset(f.name for f in fields(ConfigBody))


def sign_config(body: ConfigBody, key: Ed25519PrivateKey) -> bytes:
    if ed25519_key_id(key.public_key()) != body.key_id:
        raise ValueError("body.key_id does not match the signing key")
    data = body.to_dict()
    sig = key.sign(CONFIG_CONTEXT + _canonical(data))
    return _canonical({"config": data, "sig": base64.b64encode(sig).decode("ascii")})


def verify_config(
    raw: bytes, *, verify_keys: Mapping[str, Ed25519PublicKey], agent_id: str
) -> ConfigBody:
    """The verified configuration for ``agent_id``; raises ConfigMessageError otherwise.

    The signature is checked before anything in the body is believed."""
    if not isinstance(raw, bytes) or len(raw) > MAX_CONFIG_MESSAGE:
        raise ConfigMessageError("malformed", "not bytes or too large")
    try:
        outer = json.loads(raw)
        if not isinstance(outer, dict) or outer.keys() != {"config", "sig"}:
            raise ConfigMessageError("malformed", "expected {config, sig}")
        body, sig_b64 = outer["config"], outer["sig"]
        if not isinstance(body, dict) or not isinstance(sig_b64, str):
            raise ConfigMessageError("malformed", "config must be an object, sig a string")
        sig = base64.b64decode(sig_b64, validate=True)
        signed = CONFIG_CONTEXT + _canonical(body)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, base64, NaN
        raise ConfigMessageError("malformed", str(exc)[:200]) from exc
    kid = body.get("key_id")
    verify_key = verify_keys.get(kid) if isinstance(kid, str) else None
    if verify_key is None:
        raise ConfigMessageError("unknown_key", repr(kid)[:40])
    try:
        verify_key.verify(sig, signed)
    except InvalidSignature as exc:
        raise ConfigMessageError("bad_signature") from exc
    if body.keys() != _CONFIG_FIELDS:
        raise ConfigMessageError("malformed", "config fields")
    try:
        message = ConfigBody(**body)
    except (ValueError, TypeError) as exc:
        reason: ConfigReason = "bad_digest" if "digest" in str(exc) else "malformed"
        raise ConfigMessageError(reason, str(exc)[:200]) from exc
    if message.agent_id != agent_id:
        raise ConfigMessageError("wrong_agent", message.agent_id)
    return message
