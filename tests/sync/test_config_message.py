"""The signed configuration message: what verifies, and why everything else is refused."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync.config_message import (
    ConfigBody,
    ConfigMessageError,
    config_digest,
    config_topic,
    sign_config,
    verify_config,
)
from sync.envelope import AckBody, sign_ack
from sync.keys import ed25519_key_id

TEXT = "agent:\n  id: edge-1\n  site: s1\nmqtt:\n  password: ${MQTT_PASSWORD}\n"


def body(key: Ed25519PrivateKey, **changes: object) -> ConfigBody:
    values: dict[str, object] = {
        "agent_id": "edge-1",
        "site_id": "s1",
        "version": 3,
        "serial": 5,
        "digest": config_digest(TEXT),
        "yaml": TEXT,
        "key_id": ed25519_key_id(key.public_key()),
    }
    values.update(changes)
    return ConfigBody(**values)  # type: ignore[arg-type]


def keys(key: Ed25519PrivateKey) -> dict[str, object]:
    return {"verify_keys": {ed25519_key_id(key.public_key()): key.public_key()}}


def test_a_signed_message_verifies_and_keeps_env_references() -> None:
    key = Ed25519PrivateKey.generate()
    raw = sign_config(body(key, rollback=3), key)
    got = verify_config(raw, agent_id="edge-1", **keys(key))  # type: ignore[arg-type]
    assert (got.version, got.serial, got.rollback) == (3, 5, 3)
    assert "${MQTT_PASSWORD}" in got.yaml
    assert config_topic("p/", "s1", "edge-1") == "p/edge/s1/edge-1/v1/config"


def test_refusals_name_their_reason() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good = sign_config(body(key), key)

    def reason(raw: bytes, verify_with: Ed25519PrivateKey = key, agent: str = "edge-1") -> str:
        with pytest.raises(ConfigMessageError) as err:
            verify_config(raw, agent_id=agent, **keys(verify_with))  # type: ignore[arg-type]
        return err.value.reason

    assert reason(sign_config(body(other), other)) == "unknown_key"
    assert reason(good, agent="edge-2") == "wrong_agent"
    assert reason(b"{not json") == "malformed"
    # The text changed after signing: the signature no longer holds.
    outer = json.loads(good)
    outer["config"]["yaml"] = TEXT + "equipment: []\n"
    assert reason(json.dumps(outer).encode()) == "bad_signature"
    # The same key signing an ack: never taken for a configuration.
    ack = sign_ack(
        AckBody("edge-1", "e", [(1, 1)], {"1": "0" * 64}, ed25519_key_id(key.public_key())), key
    )
    assert reason(ack) == "malformed"


def test_a_body_that_does_not_hold_together_is_not_built() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="digest"):
        body(key, digest="0" * 64)
    with pytest.raises(ValueError, match="rollback"):
        body(key, rollback=2)  # a rollback names the version it makes current
    with pytest.raises(ValueError):
        body(key, version=0)
    with pytest.raises(ValueError, match="key_id"):
        sign_config(body(key), Ed25519PrivateKey.generate())
