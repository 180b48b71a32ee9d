"""The webhook signature: HMAC-SHA256 over the timestamp and the exact body.

A notification carries

    X-Alert-Timestamp: 1767600000                 (Unix seconds when it was sent)
    X-Alert-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
    X-Alert-Delivery:  42                         (stable across retries of one notification)
    X-Alert-Event:     opened | resolved

A receiver recomputes the HMAC with the shared secret over the timestamp header, a full
stop and the raw body bytes (before any JSON parsing), compares it in constant time, and
refuses a timestamp further than its tolerance (five minutes here) from its clock, so a
captured request cannot be replayed later. A retried notification is signed again with a new
timestamp; its delivery id does not change, which lets a receiver drop one it already has.
`verify` below is what a Python receiver needs.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Alert-Timestamp"
SIGNATURE_HEADER = "X-Alert-Signature"
DELIVERY_HEADER = "X-Alert-Delivery"
EVENT_HEADER = "X-Alert-Event"
VERSION = "v1"
TOLERANCE_S = 300


class SignatureError(Exception):
    """A notification's signature does not verify; the message says why."""


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The value of the signature header for `body` sent at `timestamp`."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"{VERSION}={mac.hexdigest()}"


def verify(
    secret: bytes,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> None:
    """Raise SignatureError unless `signature` is ours for `body` at `timestamp`, and the
    timestamp is within `tolerance_s` of `now`."""
    if not timestamp.isdigit():
        raise SignatureError("the timestamp is not a number of seconds")
    sent = int(timestamp)
    clock = time.time() if now is None else now
    if abs(clock - sent) > tolerance_s:
        raise SignatureError(f"the timestamp is more than {tolerance_s:.0f} s off")
    expected = sign(secret, body, sent)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise SignatureError("the signature does not match")
