"""Opaque, prefixed identifiers (`org_…`, `prj_…`, `job_…`)."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_id(prefix: str, length: int = 20) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))
