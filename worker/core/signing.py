"""HMAC-SHA256 signatures over a timestamp and a body: pushed reports in, callbacks out.

The timestamp is signed too, so a captured request cannot be replayed later with a fresh
timestamp; the receiver refuses timestamps outside its tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
import time


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance: float = 300.0,
    *,
    now: float | None = None,
) -> bool:
    """For receivers: whether a request is ours and fresh (constant-time comparison).

    `body` must be the raw request body (re-serialised JSON would not match); `timestamp`
    and `signature` are the X-Cascade-Timestamp and X-Cascade-Signature headers. A
    timestamp more than `tolerance` seconds from now is refused, against replays.
    """
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    try:
        expected = sign(secret, timestamp, body)
        return hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii"))
    except UnicodeEncodeError:
        return False
