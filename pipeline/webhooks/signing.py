"""The webhook envelope and its signature (`X-CapyDB-Signature: t=<unix>,v1=<hex>`).

The signature is HMAC-SHA256, keyed with the endpoint's whole secret (`whsec_…`, as
UTF-8), of `<t>.<body>`: the attempt's Unix time, a dot, and the exact body bytes.
Every attempt is signed again with its own time, so a receiver can refuse old replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

SECRET_PREFIX = "whsec_"
EVENT_TYPES = ("job.completed", "job.failed", "import.completed")
# The receiver's default tolerance between `t` and its own clock (verify()).
DEFAULT_TOLERANCE_SECONDS = 300


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and 32 random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def envelope(event_id: str, event_type: str, created_at: str, data: dict[str, Any]) -> bytes:
    """The body of an event, `{id, type, created_at, data}`, as compact JSON bytes."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    body = {"id": event_id, "type": event_type, "created_at": created_at, "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The value of `X-CapyDB-Signature` for an attempt made at `timestamp`."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def headers(secret: str, timestamp: int, body: bytes, *, event_type: str, delivery_id: str) -> dict[str, str]:
    """Every header of an attempt."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "CapyDB-Webhooks/1",
        "X-CapyDB-Event": event_type,
        "X-CapyDB-Delivery": delivery_id,
        "X-CapyDB-Signature": signature_header(secret, timestamp, body),
    }


def verify(
    secret: str, header: str, body: bytes, *, now: float, tolerance: int = DEFAULT_TOLERANCE_SECONDS
) -> bool:
    """What a receiver does: True iff `header` carries a `v1` signature of `body` under
    `secret` and its `t` is within `tolerance` seconds of `now`."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).encode()
    # As bytes: compare_digest raises TypeError for a str with other than ASCII in it.
    return any(
        hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
        for candidate in parts.get("v1", [])
    )
