"""Clerk session tokens: RS256 JWTs verified against Clerk's JWKS.

A session token acts for its active organization (the `org_id` claim, or `o.id` in
Clerk's v2 tokens), mapped to `organizations.clerk_org_id`, and for every project of
it. Checks: RS256 only (so `alg: none` and HS256 signed with the public key fail), a
known `kid`, the signature, the issuer, `exp`/`nbf` (small leeway), and the authorized
party (`azp`) when CAPY_CLERK_AUTHORIZED_PARTIES is set.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import jwt

from pipeline.errors import Forbidden, Unauthorized, Unavailable
from pipeline.models import Organization
from pipeline.principals import ALL_SCOPES, Principal

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
LEEWAY_SECONDS = 5
MAX_JWKS_BYTES = 1024 * 1024


def fetch_jwks(url: str, timeout: float) -> dict[str, Any]:
    """Clerk's JWKS document (GET with a timeout and a size bound)."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "capy-imports"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        document: dict[str, Any] = json.loads(resp.read(MAX_JWKS_BYTES))
        return document


class JwksCache:
    """Signing keys by `kid`, fetched on first use and again for an unknown `kid` or when
    stale, but never more often than `min_refresh_seconds`: a flood of tokens with made-up
    kids cannot hammer the JWKS endpoint."""

    def __init__(
        self,
        url: str,
        *,
        fetch: Callable[[str, float], dict[str, Any]] = fetch_jwks,
        timeout: float = 5.0,
        min_refresh_seconds: float = 30.0,
        max_age_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.fetch = fetch
        self.timeout = timeout
        self.min_refresh_seconds = min_refresh_seconds
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self.keys: dict[str, Any] = {}
        self.fetched_at: float | None = None
        self.fetches = 0
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        self.fetched_at = self.clock()
        self.fetches += 1
        try:
            document = self.fetch(self.url, self.timeout)
            keys = {}
            for entry in document.get("keys", []):
                if entry.get("kty") == "RSA" and entry.get("kid") and entry.get("use", "sig") == "sig":
                    keys[entry["kid"]] = jwt.PyJWK.from_dict(entry, algorithm=ALGORITHM).key
        except Exception as err:  # network, JSON or key format: any failure keeps the old keys
            log.warning("could not fetch the Clerk JWKS: %s", type(err).__name__)
            if not self.keys:
                raise Unavailable(
                    "cannot verify Clerk session tokens right now: the JWKS is unreachable; try again shortly"
                ) from err
            return
        self.keys = keys

    def key_for(self, kid: str) -> Any:
        with self._lock:
            now = self.clock()
            due = self.fetched_at is None or now - self.fetched_at >= self.min_refresh_seconds
            stale = self.fetched_at is None or now - self.fetched_at >= self.max_age_seconds
            if due and (kid not in self.keys or stale):
                self._refresh()
            key = self.keys.get(kid)
        if key is None:
            raise Unauthorized(
                "the session token's signing key is not one of Clerk's current keys; sign in again"
            )
        return key


def _organization_claim(claims: dict[str, Any]) -> str | None:
    org = claims.get("org_id")
    if org is None and isinstance(claims.get("o"), dict):
        org = claims["o"].get("id")  # Clerk session token v2
    return org if isinstance(org, str) and org else None


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


class ClerkAuthenticator:
    """An authenticator (see app.auth) for Clerk session tokens."""

    def __init__(
        self,
        jwks: JwksCache,
        *,
        issuer: str,
        authorized_parties: Sequence[str] = (),
        leeway: float = LEEWAY_SECONDS,
    ) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.authorized_parties = tuple(authorized_parties)
        self.leeway = leeway

    def __call__(self, token: str) -> Principal | None:
        if not looks_like_jwt(token):
            return None
        claims = self.verify(token)
        clerk_org = _organization_claim(claims)
        if clerk_org is None:
            raise Unauthorized(
                "the Clerk session has no active organization; select an organization and send a new token"
            )
        organization = Organization.get_or_none(Organization.clerk_org_id == clerk_org)
        if organization is None:
            raise Forbidden(
                f"the Clerk organization {clerk_org[:64]} is not linked to a CapyDB organization; "
                "ask an operator to link it (capy-imports orgs create --clerk-org-id)"
            )
        return Principal(
            organization_id=organization.id,
            project_id=None,
            actor=f"clerk_user:{claims['sub']}",
            scopes=ALL_SCOPES,
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The token's verified claims, or Unauthorized saying what is wrong."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the session token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthorized(f"Clerk session tokens must be signed with {ALGORITHM}; this one is not")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("the session token names no signing key (kid)")
        key = self.jwks.key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "nbf", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the session token has expired; get a fresh one from Clerk") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the session token is not valid yet (nbf); check the clock") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(
                "the session token was issued by another issuer than this service's Clerk instance"
            ) from None
        except jwt.MissingRequiredClaimError as err:
            raise Unauthorized(f"the session token lacks the {err.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("the session token's signature is not valid") from None
        except jwt.PyJWTError:
            raise Unauthorized("the session token is not valid") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise Unauthorized("the session token lacks the sub claim")
        if self.authorized_parties and claims.get("azp") not in self.authorized_parties:
            raise Unauthorized(
                "the session token was issued for another application (azp); it is not an authorized party here"
            )
        return claims
