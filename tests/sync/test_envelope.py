"""Envelope v1 and signed acks: round trips, every rejection reason, and fuzzing."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import zlib
from typing import Any

import pytest
import zstandard
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.envelope import (
    ACK_CONTEXT,
    MAGIC,
    REJECTION_CONTEXT,
    AckBody,
    AckError,
    EnvelopeError,
    EnvelopeHeader,
    OpenedEnvelope,
    RejectionBody,
    clean_detail,
    envelope_digest,
    open_envelope,
    parse_header,
    seal,
    sign_ack,
    sign_rejection,
    verify_ack,
    verify_cloud_message,
)
from sync.keys import (
    SUITE_MLKEM768X25519,
    SUITE_X25519,
    SUITES,
    CloudPrivateKey,
    HpkePrivateKey,
    Suite,
    ed25519_key_id,
)

AGENT_KEY = Ed25519PrivateKey.generate()
CLOUD_KEYS = {suite: CloudPrivateKey.generate(suite) for suite in SUITES}
ACK_KEY = Ed25519PrivateKey.generate()
ACK_KEY_ID = ed25519_key_id(ACK_KEY.public_key())
PLAINTEXT = json.dumps([{"kind": "count", "produced": i} for i in range(50)]).encode()


def header(suite: Suite = SUITE_X25519, **over: Any) -> EnvelopeHeader:
    fields: dict[str, Any] = {
        "agent_id": "agent-1",
        "site_id": "site-a",
        "epoch": "0190f1e2",
        "seq": 7,
        "count": 50,
        "signing_key_id": ed25519_key_id(AGENT_KEY.public_key()),
        "cloud_key_id": CLOUD_KEYS[suite].key_id,
        "suite": suite,
        "trace_id": "trace-1",
    }
    fields.update(over)
    return EnvelopeHeader(**fields)


def sealed(suite: Suite = SUITE_X25519, plaintext: bytes = PLAINTEXT) -> bytes:
    return seal(plaintext, header(suite), AGENT_KEY, CLOUD_KEYS[suite].public)


def agent_lookup(agent_id: str, key_id: str) -> Ed25519PublicKey | None:
    if (agent_id, key_id) == ("agent-1", ed25519_key_id(AGENT_KEY.public_key())):
        return AGENT_KEY.public_key()
    return None


def cloud_lookup(key_id: str) -> HpkePrivateKey | None:
    return next((k.key for k in CLOUD_KEYS.values() if k.key_id == key_id), None)


def open_(raw: bytes, **kw: Any) -> OpenedEnvelope:
    kw.setdefault("verify_key_for", agent_lookup)
    kw.setdefault("decrypt_key_for", cloud_lookup)
    return open_envelope(raw, **kw)


def reason_of(raw: bytes, **kw: Any) -> str:
    with pytest.raises(EnvelopeError) as info:
        open_(raw, **kw)
    return info.value.reason


def canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def frame(header_bytes: bytes, ciphertext: bytes, key: Ed25519PrivateKey = AGENT_KEY) -> bytes:
    """Build an envelope by hand, per the documented framing (for hostile but signed input)."""
    signed = (
        MAGIC
        + struct.pack(">I", len(header_bytes))
        + header_bytes
        + struct.pack(">I", len(ciphertext))
        + ciphertext
    )
    return signed + key.sign(signed)


def pieces(raw: bytes) -> tuple[bytes, bytes]:
    (hl,) = struct.unpack_from(">I", raw, 4)
    return raw[8 : 8 + hl], raw[12 + hl : -64]


@pytest.mark.parametrize("suite", SUITES)
def test_round_trip(suite: Suite) -> None:
    h = header(suite)
    raw = seal(PLAINTEXT, h, AGENT_KEY, CLOUD_KEYS[suite].public)
    opened = open_(raw)
    assert opened.plaintext == PLAINTEXT
    assert opened.header == h
    assert opened.header.suite == suite and opened.header.seq == 7
    assert opened.digest == hashlib.sha256(raw).hexdigest() == envelope_digest(raw)
    assert parse_header(raw) == opened.header
    assert PLAINTEXT not in raw  # encrypted, not just compressed


def test_header_is_canonical_json_in_clear() -> None:
    h = header()
    hb, _ = pieces(seal(b"x", h, AGENT_KEY, CLOUD_KEYS[SUITE_X25519].public))
    assert hb == canon(vars(h))


def test_sealing_twice_gives_different_ciphertexts() -> None:
    # fresh HPKE encapsulation per seal: no key/nonce reuse even for identical input
    assert pieces(sealed())[1] != pieces(sealed())[1]


@pytest.mark.parametrize("suite", SUITES)
def test_tampered_ciphertext_is_bad_signature(suite: Suite) -> None:
    raw = bytearray(sealed(suite))
    raw[-100] ^= 1
    assert reason_of(bytes(raw)) == "bad_signature"


@pytest.mark.parametrize("suite", SUITES)
def test_resigned_tampered_ciphertext_is_undecryptable(suite: Suite) -> None:
    hb, ct = pieces(sealed(suite))
    assert reason_of(frame(hb, ct[:-1] + bytes([ct[-1] ^ 1]))) == "undecryptable"
    assert reason_of(frame(hb, b"")) == "undecryptable"


def test_tampered_header_is_bad_signature() -> None:
    raw = sealed()
    assert b'"seq":7' in raw
    assert reason_of(raw.replace(b'"seq":7', b'"seq":8')) == "bad_signature"


def test_header_is_bound_into_hpke_info() -> None:
    # even a validly signed header swap (agent key compromised or bug) must not decrypt
    hb, ct = pieces(sealed())
    assert reason_of(frame(hb.replace(b'"seq":7', b'"seq":8'), ct)) == "undecryptable"


def test_wrong_signing_key() -> None:
    impostor = Ed25519PrivateKey.generate()
    hb, ct = pieces(sealed())
    assert reason_of(frame(hb, ct, impostor)) == "bad_signature"


def test_unknown_agent_and_unknown_signing_key() -> None:
    assert reason_of(sealed(), verify_key_for=lambda a, k: None) == "unknown_agent"
    other = Ed25519PrivateKey.generate()
    h = header(signing_key_id=ed25519_key_id(other.public_key()))
    raw = seal(PLAINTEXT, h, other, CLOUD_KEYS[SUITE_X25519].public)
    assert reason_of(raw) == "unknown_agent"


def test_unknown_cloud_key() -> None:
    assert reason_of(sealed(), decrypt_key_for=lambda k: None) == "unknown_key"
    # a key of the other suite never reaches HPKE
    mlkem_key = CLOUD_KEYS[SUITE_MLKEM768X25519].key
    assert reason_of(sealed(SUITE_X25519), decrypt_key_for=lambda k: mlkem_key) == "unknown_key"


def test_wrong_cloud_key_of_right_suite_is_undecryptable() -> None:
    stranger = CloudPrivateKey.generate(SUITE_X25519).key
    assert reason_of(sealed(), decrypt_key_for=lambda k: stranger) == "undecryptable"


def test_signature_is_verified_before_decrypting() -> None:
    calls: list[str] = []

    def spy(key_id: str) -> HpkePrivateKey | None:
        calls.append(key_id)
        return cloud_lookup(key_id)

    raw = bytearray(sealed())
    raw[-1] ^= 1
    assert reason_of(bytes(raw), decrypt_key_for=spy) == "bad_signature"
    assert reason_of(sealed(), verify_key_for=lambda a, k: None, decrypt_key_for=spy) == (
        "unknown_agent"
    )
    assert calls == []
    open_(sealed(), decrypt_key_for=spy)
    assert calls == [CLOUD_KEYS[SUITE_X25519].key_id]


def test_truncated() -> None:
    raw = sealed()
    for n in (0, 3, 4, 11, 12, 50, len(raw) - 65, len(raw) - 64, len(raw) - 1):
        assert reason_of(raw[:n]) == "malformed", n
    assert reason_of(raw + b"\0") == "malformed"


def test_oversize_is_checked_first() -> None:
    raw = sealed()
    assert reason_of(raw, max_size=len(raw) - 1) == "oversize"
    assert open_(raw, max_size=len(raw)).plaintext == PLAINTEXT
    assert reason_of(b"\0" * 100, max_size=99) == "oversize"


def test_zip_bomb_is_bounded() -> None:
    bomb = b"\0" * (4 * 1024 * 1024)
    raw = sealed(plaintext=bomb)
    assert len(raw) < 10_000  # tiny on the wire
    assert reason_of(raw, max_plaintext=1024 * 1024) == "decompression"
    assert open_(raw, max_plaintext=len(bomb)).plaintext == bomb


_ZSTD = zstandard.ZstdCompressor(level=1)


@pytest.mark.parametrize(
    ("compression", "compressed"),
    [
        ("zlib", b"not zlib at all"),
        ("zlib", zlib.compress(b"x" * 100)[:-5]),
        ("zlib", zlib.compress(b"x") + b"trailing"),
        ("zstd", b"not zstd at all"),
        ("zstd", _ZSTD.compress(b"x" * 100)[:-3]),
        # A frame that does not state its size (streaming) is refused: the size bounds memory.
        ("zstd", zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)),
        # One valid encoding: a second frame, or any byte after the first, is refused.
        ("zstd", _ZSTD.compress(b"x" * 100) + _ZSTD.compress(b"y" * 100)),
        ("zstd", _ZSTD.compress(b"x" * 100) + b"\0"),
    ],
)
def test_bad_compression_from_a_signed_sender(compression: str, compressed: bytes) -> None:
    h = header(compression=compression)
    hb = h.to_bytes()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    ct = suite.encrypt(compressed, CLOUD_KEYS[SUITE_X25519].public.key, info=MAGIC + hb)
    assert reason_of(frame(hb, ct)) == "decompression"


def test_version_and_suite_are_checked() -> None:
    hb, ct = pieces(sealed())
    assert reason_of(frame(hb.replace(b'"version":1', b'"version":2'), ct)) == (
        "unsupported_version"
    )
    raw = frame(hb, ct)
    assert reason_of(b"EGW2" + raw[4:]) == "unsupported_version"
    for suite in (b'"suite":"rsa-oaep"', b'"suite":null'):
        forged = hb.replace(b'"suite":"x25519-hkdfsha256-aes256gcm"', suite)
        assert reason_of(frame(forged, ct)) == "unsupported_suite"
        with pytest.raises(EnvelopeError) as info:
            parse_header(frame(forged, ct))
        assert info.value.reason == "unsupported_suite"


@pytest.mark.parametrize(
    "override",
    [
        {"extra": 1},
        {"seq": -1},
        {"seq": True},
        {"count": 1.0},
        {"agent_id": "a/#"},
        {"trace_id": ""},
        {"compression": "gzip"},
        {"created": "2025-01-01T10:00:00+02:00"},
        {"created": "yesterday"},
    ],
)
def test_malformed_signed_headers(override: dict[str, Any]) -> None:
    hb, ct = pieces(sealed())
    assert reason_of(frame(canon({**json.loads(hb), **override}), ct)) == "malformed"


def test_non_canonical_incomplete_or_non_object_headers() -> None:
    hb, ct = pieces(sealed())
    d = json.loads(hb)
    del d["count"]
    for bad in (json.dumps(json.loads(hb)).encode(), canon(d), b"[1,2]", b"\xff\xfe", b"[" * 4000):
        assert reason_of(frame(bad, ct)) == "malformed", bad[:20]


def test_header_validation_and_seal_preconditions() -> None:
    with pytest.raises(ValueError):
        header(agent_id="a/b")
    with pytest.raises(ValueError):
        header(created="2025-01-01T00:00:00")  # naive
    with pytest.raises(ValueError):
        header(seq=2**63)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="signing_key_id"):
        seal(b"x", header(), other, CLOUD_KEYS[SUITE_X25519].public)
    with pytest.raises(ValueError, match="cloud_key_id"):
        seal(b"x", header(), AGENT_KEY, CLOUD_KEYS[SUITE_MLKEM768X25519].public)
    with pytest.raises(ValueError, match="suite"):
        seal(b"x", header(), AGENT_KEY, CLOUD_KEYS[SUITE_MLKEM768X25519].public.key)
    with pytest.raises(ValueError, match="max_size"):
        seal(os.urandom(4000), header(), AGENT_KEY, CLOUD_KEYS[SUITE_X25519].public, max_size=1000)


# --- acks -----------------------------------------------------------------------------------


def ack_body(**over: Any) -> AckBody:
    fields: dict[str, Any] = {
        "agent_id": "agent-1",
        "epoch": "0190f1e2",
        "ranges": [[7, 9], [12, 12]],
        "digests": {"7": "a" * 64, "12": "b" * 64},
        "key_id": ACK_KEY_ID,
    }
    fields.update(over)
    return AckBody(**fields)


def verify(raw: bytes, agent_id: str = "agent-1") -> AckBody:
    return verify_ack(raw, verify_keys={ACK_KEY_ID: ACK_KEY.public_key()}, agent_id=agent_id)


def ack_reason(raw: bytes, agent_id: str = "agent-1") -> str:
    with pytest.raises(AckError) as info:
        verify(raw, agent_id)
    return info.value.reason


def test_ack_round_trip() -> None:
    body = ack_body()
    got = verify(sign_ack(body, ACK_KEY))
    assert got == body
    assert got.ranges == ((7, 9), (12, 12))
    assert [s for s in range(6, 14) if got.covers(s)] == [7, 8, 9, 12]
    assert len(got.ack_id) == 32 and got.ack_id != ack_body().ack_id


def test_ack_rejections() -> None:
    raw = sign_ack(ack_body(), ACK_KEY)
    assert ack_reason(raw, agent_id="agent-2") == "wrong_agent"
    assert ack_reason(raw.replace(b"[7,9]", b"[7,10]")) == "bad_signature"
    forger = Ed25519PrivateKey.generate()
    forged = ack_body(ranges=[[1, 100]], digests={})
    # the forger claims the real key id but signs with its own key
    payload = ACK_CONTEXT + canon(forged.to_dict())
    sig = base64.b64encode(forger.sign(payload)).decode()
    assert ack_reason(json.dumps({"body": forged.to_dict(), "sig": sig}).encode()) == (
        "bad_signature"
    )
    with pytest.raises(ValueError, match="key_id"):
        sign_ack(forged, forger)
    own = ack_body(key_id=ed25519_key_id(forger.public_key()))
    assert ack_reason(sign_ack(own, forger)) == "unknown_key"
    # a signature over the bare body, without ACK_CONTEXT, is not an ack signature
    body_bytes = canon(ack_body().to_dict())
    bare = base64.b64encode(ACK_KEY.sign(body_bytes)).decode()
    assert ack_reason(json.dumps({"body": json.loads(body_bytes), "sig": bare}).encode()) == (
        "bad_signature"
    )


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'{"body":{}}', b'{"body":[],"sig":""}', b'{"body":{},"sig":"!!"}',
     b'{"body":{"key_id":NaN},"sig":""}', b"[" * 100_000, b"\xff"],
)  # fmt: skip
def test_ack_malformed(raw: bytes) -> None:
    assert ack_reason(raw) == "malformed"


def test_ack_signed_but_invalid_body_is_malformed() -> None:
    d = ack_body().to_dict()
    d["digests"] = {"99": "c" * 64}  # names a seq the ack does not cover
    payload = canon(d)
    sig = base64.b64encode(ACK_KEY.sign(ACK_CONTEXT + payload)).decode()
    assert ack_reason(json.dumps({"body": d, "sig": sig}).encode()) == "malformed"
    with pytest.raises(ValueError):
        ack_body(digests={"99": "c" * 64})
    with pytest.raises(ValueError):
        ack_body(ranges=[[5, 4]])
    with pytest.raises(ValueError):
        ack_body(ranges=[])


# --- fuzzing --------------------------------------------------------------------------------

VALID = {suite: sealed(suite) for suite in SUITES}


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i : i + data.draw(st.integers(1, 16))]
    return bytes(buf)


def check_envelope(raw: bytes) -> None:
    try:
        opened = open_(raw, max_plaintext=64 * 1024)
    except EnvelopeError as exc:
        assert exc.reason in {
            "malformed", "oversize", "unsupported_version", "unsupported_suite", "unknown_agent",
            "unknown_key", "bad_signature", "undecryptable", "decompression",
        }  # fmt: skip
    else:
        assert opened.digest == envelope_digest(raw)
    with contextlib.suppress(EnvelopeError):
        parse_header(raw)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_open_envelope(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["random", "mutated", "mutated_resigned", "reframed"]))
    valid = VALID[data.draw(st.sampled_from(SUITES))]
    if kind == "random":
        raw = data.draw(st.binary(max_size=2048))
    elif kind == "reframed":
        # a correctly framed and signed envelope around a mutated header or ciphertext reaches
        # header validation and HPKE, which unsigned mutations never get past
        hb, ct = pieces(valid)
        if data.draw(st.booleans()):
            hb = mutate(data, hb)
        else:
            ct = mutate(data, ct)
        raw = frame(hb, ct)
    else:
        raw = mutate(data, valid)
        if kind == "mutated_resigned" and len(raw) > 64:
            raw = raw[:-64] + AGENT_KEY.sign(raw[:-64])
    check_envelope(raw)


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
ack_field_names = st.sampled_from(["agent_id", "epoch", "ranges", "digests", "issued", "ack_id"])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_verify_ack(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["random", "mutated", "signed_body"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=1024))
    elif kind == "mutated":
        raw = mutate(data, sign_ack(ack_body(), ACK_KEY))
    else:
        # validly signed bodies of arbitrary shape exercise the post-signature validation
        body = ack_body().to_dict()
        body.update(data.draw(st.dictionaries(ack_field_names, json_values, max_size=3)))
        payload = canon(body)
        sig = base64.b64encode(ACK_KEY.sign(ACK_CONTEXT + payload)).decode()
        raw = json.dumps({"body": body, "sig": sig}).encode()
    try:
        ack = verify(raw)
    except AckError as exc:
        assert exc.reason in {"malformed", "unknown_key", "bad_signature", "wrong_agent"}
    else:
        assert ack.agent_id == "agent-1"


@pytest.mark.parametrize("compression", ["zstd", "zlib"])
def test_both_compressions_round_trip_and_zstd_is_the_default(compression: str) -> None:
    assert header().compression == "zstd"
    raw = seal(
        PLAINTEXT, header(compression=compression), AGENT_KEY, CLOUD_KEYS[SUITE_X25519].public
    )
    opened = open_(raw)
    assert opened.plaintext == PLAINTEXT
    assert opened.header.compression == compression


# --- rejections -----------------------------------------------------------------------------


def rejection_body(**over: Any) -> RejectionBody:
    fields: dict[str, Any] = {
        "agent_id": "agent-1",
        "epoch": "0190f1e2",
        "seq": 7,
        "digest": "a" * 64,
        "reason": "invalid_schema",
        "detail": "an event names another agent or site",
        "key_id": ACK_KEY_ID,
    }
    fields.update(over)
    return RejectionBody(**fields)


def cloud_message(raw: bytes, agent_id: str = "agent-1") -> AckBody | RejectionBody:
    return verify_cloud_message(
        raw, verify_keys={ACK_KEY_ID: ACK_KEY.public_key()}, agent_id=agent_id
    )


def cloud_reason(raw: bytes, agent_id: str = "agent-1") -> str:
    with pytest.raises(AckError) as info:
        cloud_message(raw, agent_id)
    return info.value.reason


def test_rejection_round_trip_and_acks_still_verify() -> None:
    body = rejection_body()
    assert cloud_message(sign_rejection(body, ACK_KEY)) == body
    ack = ack_body()
    assert cloud_message(sign_ack(ack, ACK_KEY)) == ack
    # verify_ack stays an ack-only door: a genuine rejection is not an ack
    assert ack_reason(sign_rejection(body, ACK_KEY)) == "malformed"


def test_forged_or_confused_rejections_are_refused() -> None:
    raw = sign_rejection(rejection_body(), ACK_KEY)
    assert cloud_reason(raw, agent_id="agent-2") == "wrong_agent"
    assert cloud_reason(raw.replace(b'"seq":7', b'"seq":8')) == "bad_signature"
    stranger = Ed25519PrivateKey.generate()
    own = rejection_body(key_id=ed25519_key_id(stranger.public_key()))
    assert cloud_reason(sign_rejection(own, stranger)) == "unknown_key"
    # an ack signature cannot be replayed as a rejection (or the reverse): own contexts
    body = rejection_body().to_dict()
    as_ack = base64.b64encode(ACK_KEY.sign(ACK_CONTEXT + canon(body))).decode()
    assert cloud_reason(canon({"rejection": body, "sig": as_ack})) == "bad_signature"
    ack = ack_body().to_dict()
    as_rejection = base64.b64encode(ACK_KEY.sign(REJECTION_CONTEXT + canon(ack))).decode()
    assert cloud_reason(canon({"body": ack, "sig": as_rejection})) == "bad_signature"
    # both bodies at once, or an unknown kind of message
    assert cloud_reason(canon({"body": ack, "rejection": body, "sig": as_ack})) == "malformed"
    assert cloud_reason(canon({"verdict": body, "sig": as_ack})) == "malformed"


@pytest.mark.parametrize(
    "override",
    [{"seq": -1}, {"seq": True}, {"digest": "z" * 64}, {"reason": "Bad Reason"},
     {"detail": "nul\0inside"}, {"detail": "x" * 501}, {"agent_id": "a/b"}],
)  # fmt: skip
def test_rejection_bodies_are_bounded(override: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        rejection_body(**override)
    # and a body the cloud signed anyway is still refused by the agent
    d = rejection_body().to_dict() | override
    sig = base64.b64encode(ACK_KEY.sign(REJECTION_CONTEXT + canon(d))).decode()
    assert cloud_reason(json.dumps({"rejection": d, "sig": sig}).encode()) == "malformed"


def test_clean_detail_keeps_printable_ascii_only() -> None:
    assert clean_detail("a\0b\x1b[31m\u00e9" + "x" * 600) == "a?b?[31m?" + "x" * 491


def test_wire_messages_take_fields_in_order_and_coerce_nothing() -> None:
    h = header()
    positional = EnvelopeHeader(
        "agent-1", "site-a", "0190f1e2", 7, 50, h.signing_key_id, h.cloud_key_id,
        SUITE_X25519, h.created, "zstd", "trace-1",
    )  # fmt: skip
    assert positional == h
    with pytest.raises(TypeError):
        header(color="red")  # an unknown field
    for wrong in ({"seq": "7"}, {"seq": True}, {"count": 1.0}, {"version": True}):
        with pytest.raises(ValueError):
            header(**wrong)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.seq = 8  # type: ignore[misc]
    ack = AckBody("agent-1", "0190f1e2", [[7, 9]], {"8": "a" * 64}, ACK_KEY_ID)  # type: ignore[list-item]
    assert ack.ranges == ((7, 9),) and ack.digests == {"8": "a" * 64}
    assert ack.covers(9) and not ack.covers(10)
    with pytest.raises(ValueError, match="first_seq must be an integer"):
        AckBody("agent-1", "0190f1e2", [(True, 9)], {}, ACK_KEY_ID)


def test_a_refused_header_is_said_in_one_line() -> None:
    d = json.loads(header().to_bytes())
    d["seq"] = "7"
    hb = canon(d)
    raw = b"EGW1" + len(hb).to_bytes(4, "big") + hb + (1).to_bytes(4, "big") + b"x" + bytes(64)
    with pytest.raises(EnvelopeError) as refused:
        parse_header(raw)
    assert refused.value.reason == "malformed"
    assert refused.value.detail == "seq must be an integer in [0, 9223372036854775807]"
