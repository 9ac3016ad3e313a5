"""API keys: `capy_live_<random>`, stored as a SHA-256 hash plus a lookup prefix.

The plaintext exists only in the return value of `create_key`. Verification looks up
by prefix and compares hashes in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from pipeline.errors import Unauthorized
from pipeline.ids import new_id
from pipeline.models import ApiKey, Organization, Project, utcnow

KEY_PREFIX = "capy_live_"
_LOOKUP_CHARS = 12
DEFAULT_SCOPES = ["imports:write", "imports:read"]


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
) -> CreatedKey:
    if project is not None and project.organization_id != organization.id:
        raise ValueError(f"project {project.id} does not belong to organization {organization.id}")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32).replace("-", "x").replace("_", "y")
    record = ApiKey.create(
        id=new_id("key"),
        organization=organization,
        project=project,
        key_prefix=plaintext[: len(KEY_PREFIX) + _LOOKUP_CHARS],
        key_hash=_hash(plaintext),
        name=name,
        scopes=DEFAULT_SCOPES,
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
