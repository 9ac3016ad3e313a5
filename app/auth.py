"""Authentication: every /v1 route needs a bearer token; resources may opt out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import falcon

from pipeline import apikeys
from pipeline.errors import Unauthorized
from pipeline.principals import Principal

# An authenticator turns a token into a Principal, returns None if the token is not
# of its kind, or raises Unauthorized. Clerk session tokens plug in here.
Authenticator = Callable[[str], "Principal | None"]


def api_key_authenticator(token: str) -> Principal | None:
    if not token.startswith(apikeys.KEY_PREFIX):
        return None
    key = apikeys.verify_key(token)
    return Principal(
        organization_id=key.organization_id, project_id=key.project_id, actor=f"api_key:{key.id}"
    )


def bearer_token(req: falcon.Request) -> str:
    header = req.get_header("Authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be: Bearer <API key>")
        return token.strip()
    key = req.get_header("X-API-Key")
    if key and key.strip():
        return key.strip()
    raise Unauthorized("authentication required: send Authorization: Bearer <API key>")


class AuthMiddleware:
    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = list(authenticators)

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict
    ) -> None:
        if resource is None or not getattr(resource, "auth_required", True):
            return
        token = bearer_token(req)
        for authenticate in self.authenticators:
            principal = authenticate(token)
            if principal is not None:
                req.context.principal = principal
                return
        raise Unauthorized("the token is not a CapyDB API key (capy_live_…)")
