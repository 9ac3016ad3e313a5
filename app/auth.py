"""Authentication, rate limits and scopes: every /v1 route needs a bearer token;
resources may opt out with `auth_required = False`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import falcon

from pipeline import apikeys
from pipeline.errors import Unauthorized
from pipeline.principals import JOBS_READ, PROJECTS_WRITE, Principal
from pipeline.ratelimit import RateLimiter

# An authenticator turns a token into a Principal, returns None if the token is not
# of its kind, or raises Unauthorized. API keys and Clerk session tokens plug in here.
Authenticator = Callable[[str], "Principal | None"]

MAX_TOKEN_LENGTH = 8192
_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN_LENGTH}}}")


def api_key_authenticator(token: str) -> Principal | None:
    if not token.startswith(apikeys.KEY_PREFIX):
        return None
    key = apikeys.verify_key(token)
    return Principal(
        organization_id=key.organization_id,
        project_id=key.project_id,
        actor=f"api_key:{key.id}",
        scopes=frozenset(key.scopes or ()),
    )


def _checked(token: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise Unauthorized(
            f"the token must be 1 to {MAX_TOKEN_LENGTH} printable ASCII characters without spaces"
        )
    return token


def bearer_token(req: falcon.Request) -> str:
    header = req.get_header("Authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be: Bearer <API key>")
        return _checked(token.strip())
    key = req.get_header("X-API-Key")
    if key and key.strip():
        return _checked(key.strip())
    raise Unauthorized("authentication required: send Authorization: Bearer <API key>")


def required_scope(resource: Any, method: str) -> str:
    """The scope a request needs: the resource's `required_scopes[method]`, else reading
    (GET, HEAD) needs jobs:read and anything else projects:write."""
    declared = getattr(resource, "required_scopes", {})
    if method in declared:
        scope: str = declared[method]
        return scope
    return JOBS_READ if method in ("GET", "HEAD") else PROJECTS_WRITE


class AuthMiddleware:
    def __init__(
        self,
        authenticators: Sequence[Authenticator],
        rate_limiter: RateLimiter | None = None,
        *,
        unknown_token_message: str = "the token is not a CapyDB API key (capy_live_…)",
    ) -> None:
        self.authenticators = list(authenticators)
        self.rate_limiter = rate_limiter
        self.unknown_token_message = unknown_token_message

    def authenticate(self, token: str) -> Principal:
        for authenticate in self.authenticators:
            principal = authenticate(token)
            if principal is not None:
                return principal
        raise Unauthorized(self.unknown_token_message)

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        if resource is None or not getattr(resource, "auth_required", True):
            return
        principal = self.authenticate(bearer_token(req))
        if self.rate_limiter is not None:
            self.rate_limiter.hit(principal.credential)
        principal.require(required_scope(resource, req.method), f"{req.method} {req.path}")
        req.context.principal = principal
