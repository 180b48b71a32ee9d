"""Envelope v1 (one sealed batch) and signed acks: the bytes that cross the edge<->cloud wire.

Envelope framing, all integers big-endian u32::

    b"EGW1" | len(H) | H | len(C) | C | S

H: canonical JSON header (sorted keys, compact, ASCII); C: HPKE base-mode ciphertext (enc || ct)
of the compressed plaintext (zstd, or zlib from older agents) to the cloud key, with
info = b"EGW1" + H; S: 64-byte Ed25519 signature by the agent over everything before it.
The header must be canonical (re-encoding it gives the same bytes) and the lengths must add up
exactly, so one batch has exactly one valid encoding.

Ack: JSON ``{"body": {...}, "sig": base64}``; the signature covers ``ACK_CONTEXT`` + the
canonical body, so an ack signature can never be confused with any other signed message.
Rejection: JSON ``{"rejection": {...}, "sig": base64}`` on the same ack topic, signed by the
same cloud key over ``REJECTION_CONTEXT`` + the canonical body: the cloud will never store
the batch it names (agent, epoch, seq and the digest of the refused envelope), for a reason.
Both are checked by ``verify_cloud_message``; an agent acts only on what it returns.

Pure code: no I/O; keys come in as objects or lookup callables.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.keys import (
    SUITE_MLKEM768X25519,
    SUITE_X25519,
    SUITES,
    CloudPublicKey,
    HpkePrivateKey,
    HpkePublicKey,
    Suite,
    ed25519_key_id,
)

MAGIC = b"EGW1"
# zstd (the default) is about ten times faster than zlib level 6 on event batches and gives
# smaller envelopes; zlib stays accepted so batches sealed by older agents still open.
COMPRESSIONS: tuple[str, ...] = ("zstd", "zlib")
ACK_CONTEXT = b"EGW1 ack\n"
REJECTION_CONTEXT = b"EGW1 rejection\n"
SIG_LEN = 64
MAX_ENVELOPE = 16 * 1024 * 1024
MAX_PLAINTEXT = 64 * 1024 * 1024
MAX_ACK = 1024 * 1024
_MAX_HEADER = 4096
_U32 = struct.Struct(">I")
_MAX_SEQ = 2**63 - 1  # PostgreSQL bigint
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")  # safe inside MQTT topic levels and file names
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HPKE = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_MLKEM768X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
_PUBLIC_TYPE: dict[str, type[HpkePublicKey]] = {
    SUITE_X25519: x25519.X25519PublicKey,
    SUITE_MLKEM768X25519: hpke.MLKEM768X25519PublicKey,
}
_PRIVATE_TYPE: dict[str, type[HpkePrivateKey]] = {
    SUITE_X25519: x25519.X25519PrivateKey,
    SUITE_MLKEM768X25519: hpke.MLKEM768X25519PrivateKey,
}

EnvelopeReason = Literal[
    "malformed", "oversize", "unsupported_version", "unsupported_suite", "unknown_agent",
    "unknown_key", "bad_signature", "undecryptable", "decompression",
]  # fmt: skip
AckReason = Literal["malformed", "unknown_key", "bad_signature", "wrong_agent"]
# Refusals that open_envelope raises only after the agent's signature has verified: the
# header that names the agent is then the agent's own.
AFTER_SIGNATURE: frozenset[EnvelopeReason] = frozenset(
    {"unknown_key", "undecryptable", "decompression"}
)
_REASON = re.compile(r"[a-z_]{1,64}")
_DETAIL_MAX = 500


class EnvelopeError(Exception):
    """An envelope was rejected; ``reason`` is the stable label for counters and quarantine."""

    def __init__(self, reason: EnvelopeReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: EnvelopeReason = reason
        self.detail = detail


class AckError(Exception):
    """An ack or a rejection from the cloud was refused; ``reason`` is one of
    malformed/unknown_key/bad_signature/wrong_agent."""

    def __init__(self, reason: AckReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: AckReason = reason


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _reason_of(exc: Exception) -> str:
    """One line for a refused header or body."""
    return " ".join(str(exc).split())


def _check_id(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{name} must match {_ID.pattern}")


def _check_int(name: str, value: object, hi: int) -> None:
    # bool is an int subclass; JSON true must not pass as 1
    if type(value) is not int or not 0 <= value <= hi:
        raise ValueError(f"{name} must be an integer in [0, {hi}]")


def _check_utc(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError(f"{name} must be an ISO-8601 string")
    ts = datetime.fromisoformat(value)
    if ts.utcoffset() != timedelta(0):
        raise ValueError(f"{name} must be UTC")


# The messages of the wire are frozen dataclasses that check every field when made
# (`__post_init__`): an unknown field is a TypeError, a wrong value a ValueError, and nothing
# is coerced (JSON `true` is not the integer 1, `"7"` not the seq 7).


@dataclass(frozen=True)
class EnvelopeHeader:
    """The cleartext, signed routing header of one batch."""

    agent_id: str
    site_id: str
    epoch: str
    seq: int
    count: int
    signing_key_id: str
    cloud_key_id: str
    suite: Suite = SUITE_X25519
    created: str = field(default_factory=utc_now_iso)
    compression: str = "zstd"
    trace_id: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != 1:
            raise ValueError("version must be 1")
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}")
        for name in ("agent_id", "site_id", "epoch", "signing_key_id", "cloud_key_id"):
            _check_id(name, getattr(self, name))
        _check_id("trace_id", self.trace_id, optional=True)
        _check_int("seq", self.seq, _MAX_SEQ)
        _check_int("count", self.count, 2**31 - 1)
        _check_utc("created", self.created)
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}")

    def to_bytes(self) -> bytes:
        return _canonical({name: getattr(self, name) for name in sorted(_HEADER_FIELDS)})


_HEADER_FIELDS = frozenset(f.name for f in fields(EnvelopeHeader))


@dataclass(frozen=True)
class OpenedEnvelope:
    header: EnvelopeHeader
    plaintext: bytes = field(repr=False)
    digest: str  # sha256 hex of the raw envelope; what the ack names


def envelope_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def seal(
    plaintext: bytes,
    header: EnvelopeHeader,
    signing_key: Ed25519PrivateKey,
    cloud_public_key: CloudPublicKey | HpkePublicKey,
    *,
    max_size: int = MAX_ENVELOPE,
    max_plaintext: int = MAX_PLAINTEXT,
) -> bytes:
    """Compress, encrypt to the cloud key and sign one batch.

    Raises ValueError when the keys do not match the header or the result would exceed the
    limits the cloud enforces: such a batch could never be acked, so it must be split instead.
    HPKE derives a fresh key and nonce per call from a new ephemeral KEM key; no nonce here.
    """
    if isinstance(cloud_public_key, CloudPublicKey):
        if cloud_public_key.key_id != header.cloud_key_id:
            raise ValueError("header.cloud_key_id does not match the cloud public key")
        cloud_public_key = cloud_public_key.key
    wanted = (
        x25519.X25519PublicKey if header.suite == SUITE_X25519 else hpke.MLKEM768X25519PublicKey
    )
    if not isinstance(cloud_public_key, wanted):
        raise ValueError(f"cloud public key does not fit suite {header.suite}")
    if ed25519_key_id(signing_key.public_key()) != header.signing_key_id:
        raise ValueError("header.signing_key_id does not match the signing key")
    if len(plaintext) > max_plaintext:
        raise ValueError("plaintext exceeds max_plaintext")
    hb = header.to_bytes()
    ct = _HPKE[header.suite].encrypt(
        _compress(header.compression, plaintext), cloud_public_key, info=MAGIC + hb
    )
    signed = MAGIC + _U32.pack(len(hb)) + hb + _U32.pack(len(ct)) + ct
    if len(signed) + SIG_LEN > max_size:
        raise ValueError("sealed envelope exceeds max_size; split the batch")
    return signed + signing_key.sign(signed)


def _split(raw: object) -> tuple[bytes, bytes, bytes, bytes]:
    """Return (header bytes, ciphertext, signed part, signature) or raise EnvelopeError."""
    if not isinstance(raw, bytes):
        raise EnvelopeError("malformed", "envelope must be bytes")
    if raw[:3] == MAGIC[:3] and raw[3:4] not in (b"", MAGIC[3:]):
        raise EnvelopeError("unsupported_version", f"framing {raw[:4]!r}")
    if len(raw) < len(MAGIC) + 8 + SIG_LEN or raw[:4] != MAGIC:
        raise EnvelopeError("malformed", "bad magic or too short")
    (hl,) = _U32.unpack_from(raw, 4)
    if hl > _MAX_HEADER or 8 + hl + 4 > len(raw):
        raise EnvelopeError("malformed", "bad header length")
    (cl,) = _U32.unpack_from(raw, 8 + hl)
    end = 12 + hl + cl
    if end + SIG_LEN != len(raw):
        raise EnvelopeError("malformed", "lengths do not add up")
    return raw[8 : 8 + hl], raw[12 + hl : end], raw[:end], raw[end:]


def _header_from(hb: bytes) -> EnvelopeHeader:
    try:
        d = json.loads(hb)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("malformed", "header is not JSON") from exc
    if not isinstance(d, dict):
        raise EnvelopeError("malformed", "header is not an object")
    if d.get("version") != 1 or type(d.get("version")) is not int:
        raise EnvelopeError("unsupported_version", repr(d.get("version"))[:40])
    if d.get("suite") not in SUITES:
        raise EnvelopeError("unsupported_suite", repr(d.get("suite"))[:80])
    if d.keys() != _HEADER_FIELDS:
        raise EnvelopeError("malformed", "header fields")
    try:
        header = EnvelopeHeader(**d)
    except (ValueError, TypeError) as exc:
        raise EnvelopeError("malformed", _reason_of(exc)) from exc
    if header.to_bytes() != hb:
        raise EnvelopeError("malformed", "header is not canonical")
    return header


@dataclass(frozen=True)
class Framed:
    """An envelope split into its parts with its header parsed, NOTHING verified yet: what
    routing, logging and a replay check may read before open_framed verifies it."""

    raw: bytes = field(repr=False)
    header: EnvelopeHeader
    header_bytes: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    signed: bytes = field(repr=False)
    signature: bytes = field(repr=False)


def frame(raw: bytes) -> Framed:
    """Split an envelope and parse its header, verifying nothing (EnvelopeError if the
    framing or the header is not valid)."""
    hb, ct, signed, sig = _split(raw)
    return Framed(raw, _header_from(hb), hb, ct, signed, sig)


def parse_header(raw: bytes) -> EnvelopeHeader:
    """Read the header WITHOUT verifying anything: for routing and logging only."""
    return _header_from(_split(raw)[0])


# One zstd compressor per thread, made at its first batch: setting up a compressor cost
# about as much as compressing a batch of a second. A compressor is not thread-safe; each
# `compress` call is a frame of its own, the same bytes as from a new compressor.
_zstd = threading.local()


def _compress(compression: str, plaintext: bytes) -> bytes:
    if compression == "zstd":
        compressor: zstandard.ZstdCompressor | None = getattr(_zstd, "compressor", None)
        if compressor is None:
            # Level 1 with the content size in the frame (the opener bounds its output by it).
            compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
            _zstd.compressor = compressor
        compressed: bytes = compressor.compress(plaintext)
        return compressed
    return zlib.compress(plaintext, 6)


def _decompress(compression: str, data: bytes, max_plaintext: int) -> bytes:
    return _unzstd(data, max_plaintext) if compression == "zstd" else _inflate(data, max_plaintext)


def _unzstd(data: bytes, max_plaintext: int) -> bytes:
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise EnvelopeError("decompression", str(exc)) from exc
    if size < 0:
        raise EnvelopeError("decompression", "zstd frame without its content size")
    if size > max_plaintext:
        raise EnvelopeError("decompression", "plaintext exceeds max_plaintext")
    try:
        # A fresh decompressor per call: ingest opens envelopes on several threads. Exactly
        # one frame: a second frame or any byte after the first is refused, not ignored.
        out: bytes = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=size, read_across_frames=False, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise EnvelopeError("decompression", str(exc)) from exc
    if len(out) != size:
        raise EnvelopeError("decompression", "truncated stream")
    return out


def _inflate(data: bytes, max_plaintext: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # max_length bounds the output, so a zip bomb costs at most max_plaintext + 1 bytes
        out = inflater.decompress(data, max_plaintext + 1)
    except zlib.error as exc:
        raise EnvelopeError("decompression", str(exc)) from exc
    if len(out) > max_plaintext:
        raise EnvelopeError("decompression", "plaintext exceeds max_plaintext")
    if not inflater.eof or inflater.unused_data:
        raise EnvelopeError("decompression", "truncated stream or trailing data")
    return out


def open_envelope(
    raw: bytes,
    *,
    verify_key_for: Callable[[str, str], Ed25519PublicKey | None],
    decrypt_key_for: Callable[[str], HpkePrivateKey | None],
    max_size: int = MAX_ENVELOPE,
    max_plaintext: int = MAX_PLAINTEXT,
) -> OpenedEnvelope:
    """Verify, then decrypt and decompress one envelope.

    ``verify_key_for(agent_id, signing_key_id)`` returns the agent's registered key or None
    (reason ``unknown_agent``); ``decrypt_key_for(cloud_key_id)`` returns a private key or
    None (``unknown_key``). Exceptions raised by those callables propagate unchanged: a
    registry outage must not be mistaken for a bad message and quarantined.
    The signature is checked before any decryption, so unauthenticated input never reaches
    HPKE or zlib.
    """
    if isinstance(raw, bytes) and len(raw) > max_size:
        raise EnvelopeError("oversize", f"{len(raw)} > {max_size} bytes")
    return open_framed(
        frame(raw),
        verify_key_for=verify_key_for,
        decrypt_key_for=decrypt_key_for,
        max_plaintext=max_plaintext,
    )


def open_framed(
    framed: Framed,
    *,
    verify_key_for: Callable[[str, str], Ed25519PublicKey | None],
    decrypt_key_for: Callable[[str], HpkePrivateKey | None],
    max_plaintext: int = MAX_PLAINTEXT,
) -> OpenedEnvelope:
    """open_envelope for an envelope already framed (its header is parsed once): verify,
    then decrypt and decompress. The caller bounds the envelope's size."""
    header, hb, ct = framed.header, framed.header_bytes, framed.ciphertext
    signed, sig = framed.signed, framed.signature
    verify_key = verify_key_for(header.agent_id, header.signing_key_id)
    if verify_key is None:
        raise EnvelopeError("unknown_agent", f"{header.agent_id}/{header.signing_key_id}")
    try:
        verify_key.verify(sig, signed)
    except InvalidSignature as exc:
        raise EnvelopeError("bad_signature") from exc
    key = decrypt_key_for(header.cloud_key_id)
    wanted = (
        x25519.X25519PrivateKey if header.suite == SUITE_X25519 else hpke.MLKEM768X25519PrivateKey
    )
    if key is None or not isinstance(key, wanted):
        raise EnvelopeError("unknown_key", header.cloud_key_id)
    try:
        compressed = _HPKE[header.suite].decrypt(ct, key, info=MAGIC + hb)
    except Exception as exc:  # InvalidTag, or ValueError for a short/invalid encapsulation
        raise EnvelopeError("undecryptable") from exc
    plaintext = _decompress(header.compression, compressed, max_plaintext)
    return OpenedEnvelope(header, plaintext, envelope_digest(framed.raw))


# --- acks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AckBody:
    """What the cloud stored: inclusive seq ranges of one (agent, epoch) and their digests."""

    agent_id: str
    epoch: str
    ranges: Sequence[tuple[int, int]]  # normalised to a tuple of tuples
    digests: Mapping[str, str]  # str(seq) -> sha256 hex of the stored envelope; made a dict
    key_id: str
    ack_id: str = field(default_factory=lambda: secrets.token_hex(16))
    issued: str = field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        # Ranges arrive as JSON lists: checked here and made tuples (frozen, hence setattr).
        raw_ranges = self.ranges
        if not isinstance(raw_ranges, Sequence) or isinstance(raw_ranges, str) or not raw_ranges:
            raise ValueError("ranges must be a non-empty list")
        ranges: list[tuple[int, int]] = []
        for r in raw_ranges:
            if not isinstance(r, Sequence) or isinstance(r, str) or len(r) != 2:
                raise ValueError("each range is [first_seq, last_seq]")
            _check_int("first_seq", r[0], _MAX_SEQ)
            _check_int("last_seq", r[1], _MAX_SEQ)
            if r[0] > r[1]:
                raise ValueError("first_seq > last_seq")
            ranges.append((r[0], r[1]))
        object.__setattr__(self, "ranges", tuple(ranges))
        if not isinstance(self.digests, Mapping):
            raise ValueError("digests must be an object")
        object.__setattr__(self, "digests", dict(self.digests))
        for name in ("agent_id", "epoch", "key_id", "ack_id"):
            _check_id(name, getattr(self, name))
        _check_utc("issued", self.issued)
        for seq, digest in self.digests.items():
            if not isinstance(seq, str) or not seq.isdigit() or seq != str(int(seq)):
                raise ValueError("digest keys must be decimal seqs")
            if not self.covers(int(seq)):
                raise ValueError(f"digest for seq {seq} outside the acked ranges")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ValueError("digests must be sha256 hex")

    def covers(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self.ranges)

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _ACK_FIELDS}
        d["ranges"] = [list(r) for r in self.ranges]
        d["digests"] = dict(self.digests)
        return d


_ACK_FIELDS = frozenset(f.name for f in fields(AckBody))


def clean_detail(text: str) -> str:
    """A refusal's detail as it may travel and be stored: printable ASCII, bounded. What was
    refused may hold NUL or other bytes the agent could not send back in its loss event."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:_DETAIL_MAX])


@dataclass(frozen=True)
class RejectionBody:
    """A batch the cloud refuses for good: its key, the digest of the envelope, the reason.

    Only the envelope with that digest is named, so a rejection can never delete another
    batch (another epoch, or a batch sealed again under the same seq)."""

    agent_id: str
    epoch: str
    seq: int
    digest: str  # sha256 hex of the refused envelope
    reason: str  # a stable label, as counted and kept in quarantine
    detail: str
    key_id: str
    rejection_id: str = field(default_factory=lambda: secrets.token_hex(16))
    issued: str = field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        for name in ("agent_id", "epoch", "key_id", "rejection_id"):
            _check_id(name, getattr(self, name))
        _check_utc("issued", self.issued)
        _check_int("seq", self.seq, _MAX_SEQ)
        if not isinstance(self.digest, str) or not _HEX64.fullmatch(self.digest):
            raise ValueError("digest must be sha256 hex")
        if not isinstance(self.reason, str) or not _REASON.fullmatch(self.reason):
            raise ValueError(f"reason must match {_REASON.pattern}")
        if not isinstance(self.detail, str) or clean_detail(self.detail) != self.detail:
            raise ValueError(f"detail must be printable ASCII of at most {_DETAIL_MAX} chars")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _REJECTION_FIELDS}


_REJECTION_FIELDS = frozenset(f.name for f in fields(RejectionBody))
# The outer key says which message it is; each has its own signing context.
_CLOUD_MESSAGES: dict[str, tuple[bytes, frozenset[str], type[AckBody] | type[RejectionBody]]] = {
    "body": (ACK_CONTEXT, _ACK_FIELDS, AckBody),
    "rejection": (REJECTION_CONTEXT, _REJECTION_FIELDS, RejectionBody),
}


def _sign(outer: str, context: bytes, body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    if ed25519_key_id(key.public_key()) != body["key_id"]:
        raise ValueError("body.key_id does not match the ack-signing key")
    sig = key.sign(context + _canonical(body))
    return _canonical({outer: body, "sig": base64.b64encode(sig).decode("ascii")})


def sign_ack(body: AckBody, key: Ed25519PrivateKey) -> bytes:
    return _sign("body", ACK_CONTEXT, body.to_dict(), key)


def sign_rejection(body: RejectionBody, key: Ed25519PrivateKey) -> bytes:
    return _sign("rejection", REJECTION_CONTEXT, body.to_dict(), key)


def verify_cloud_message(
    raw: bytes,
    *,
    verify_keys: Mapping[str, Ed25519PublicKey],
    agent_id: str,
    max_size: int = MAX_ACK,
) -> AckBody | RejectionBody:
    """Verify a signed ack or rejection for ``agent_id``; only what this returns may delete
    anything from the outbox. Raises AckError."""
    if not isinstance(raw, bytes) or len(raw) > max_size:
        raise AckError("malformed", "not bytes or too large")
    try:
        outer = json.loads(raw)
        if not isinstance(outer, dict) or len(outer) != 2 or "sig" not in outer:
            raise AckError("malformed", "expected {body, sig} or {rejection, sig}")
        (name,) = outer.keys() - {"sig"}
        if name not in _CLOUD_MESSAGES:
            raise AckError("malformed", "expected {body, sig} or {rejection, sig}")
        context, names, model = _CLOUD_MESSAGES[name]
        body, sig_b64 = outer[name], outer["sig"]
        if not isinstance(body, dict) or not isinstance(sig_b64, str):
            raise AckError("malformed", "body must be an object, sig a string")
        sig = base64.b64decode(sig_b64, validate=True)
        signed = context + _canonical(body)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, base64 (binascii.Error), NaN
        raise AckError("malformed", str(exc)[:200]) from exc
    kid = body.get("key_id")
    verify_key = verify_keys.get(kid) if isinstance(kid, str) else None
    if verify_key is None:
        raise AckError("unknown_key", repr(kid)[:40])
    try:
        verify_key.verify(sig, signed)
    except InvalidSignature as exc:
        raise AckError("bad_signature") from exc
    if body.keys() != names:
        raise AckError("malformed", f"{name} fields")
    try:
        message = model(**body)
    except (ValueError, TypeError) as exc:
        raise AckError("malformed", _reason_of(exc)[:200]) from exc
    if message.agent_id != agent_id:
        raise AckError("wrong_agent", message.agent_id)
    return message


def verify_ack(
    raw: bytes,
    *,
    verify_keys: Mapping[str, Ed25519PublicKey],
    agent_id: str,
    max_size: int = MAX_ACK,
) -> AckBody:
    """Verify a signed ack for ``agent_id``; only a returned AckBody may delete anything."""
    message = verify_cloud_message(
        raw, verify_keys=verify_keys, agent_id=agent_id, max_size=max_size
    )
    if not isinstance(message, AckBody):
        raise AckError("malformed", "a rejection, not an ack")
    return message
