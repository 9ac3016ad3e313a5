"""API keys: `capy_live_<random>`, stored as a SHA-256 hash plus a lookup prefix.

The plaintext exists only in the return value of `create_key`. Verification looks up
by prefix and compares hashes in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import InvalidRequest, NotFound, Unauthorized
from pipeline.ids import new_id
from pipeline.models import ApiKey, Organization, Project, utcnow
from pipeline.principals import SCOPES

KEY_PREFIX = "capy_live_"
_LOOKUP_CHARS = 12
DEFAULT_SCOPES = list(SCOPES)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedKey:
    record: ApiKey
    plaintext: str


def create_key(
    organization: Organization,
    project: Project | None = None,
    *,
    name: str = "",
    expires_at: dt.datetime | None = None,
    scopes: Sequence[str] | None = None,
) -> CreatedKey:
    """A new key; `scopes` default to all of them. The plaintext is in the result only."""
    if project is not None and project.organization_id != organization.id:
        raise InvalidRequest(f"project {project.id} does not belong to organization {organization.id}")
    chosen = list(dict.fromkeys(scopes)) if scopes else DEFAULT_SCOPES
    unknown = [scope for scope in chosen if scope not in SCOPES]
    if unknown:
        raise InvalidRequest(f"unknown scope(s): {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32).replace("-", "x").replace("_", "y")
    record = ApiKey.create(
        id=new_id("key"),
        organization=organization,
        project=project,
        key_prefix=plaintext[: len(KEY_PREFIX) + _LOOKUP_CHARS],
        key_hash=_hash(plaintext),
        name=name,
        scopes=chosen,
        expires_at=expires_at,
    )
    return CreatedKey(record, plaintext)


def verify_key(plaintext: str, *, now: dt.datetime | None = None) -> ApiKey:
    """The active key for `plaintext`, or Unauthorized saying why not."""
    now = now or utcnow()
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) < len(KEY_PREFIX) + _LOOKUP_CHARS:
        raise Unauthorized("the API key is malformed; keys look like capy_live_…")
    record = ApiKey.get_or_none(ApiKey.key_prefix == plaintext[: len(KEY_PREFIX) + _LOOKUP_CHARS])
    if record is None or not hmac.compare_digest(record.key_hash, _hash(plaintext)):
        raise Unauthorized("the API key is not valid; check it or create a new one")
    if record.revoked_at is not None:
        raise Unauthorized("the API key has been revoked; create a new one")
    if record.expires_at is not None and record.expires_at <= now:
        raise Unauthorized("the API key has expired; create a new one")
    # Coarse last-use tracking: at most one write per key per minute.
    if record.last_used_at is None or now - record.last_used_at > dt.timedelta(minutes=1):
        ApiKey.update(last_used_at=now).where(ApiKey.id == record.id).execute()
    return record


def list_keys(organization: Organization) -> list[ApiKey]:
    """The organization's keys, newest first (hashes stay in the database)."""
    return list(
        ApiKey.select().where(ApiKey.organization == organization.id).order_by(ApiKey.created_at.desc())
    )


def revoke_key(key_id: str, *, now: dt.datetime | None = None) -> tuple[ApiKey, bool]:
    """Revoke the key; returns (key, True) if this call revoked it, False if it already was."""
    now = now or utcnow()
    updated = (
        ApiKey.update(revoked_at=now).where((ApiKey.id == key_id) & ApiKey.revoked_at.is_null()).execute()
    )
    record = ApiKey.get_or_none(ApiKey.id == key_id)
    if record is None:
        raise NotFound(f"API key {key_id} does not exist")
    return record, bool(updated)


def key_state(record: ApiKey, *, now: dt.datetime | None = None) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= (now or utcnow()):
        return "expired"
    return "active"
