"""Validating what a client sends outside the body, before anything reaches the core.

Path parameters, the headers the API reads and the query parameters it accepts are
checked here, so a hostile value (a NUL, a 7,000-character key, a Unicode digit)
answers 400 saying what to fix instead of failing somewhere deeper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import falcon

from pipeline.errors import InvalidRequest

MAX_ID_LENGTH = 64
MAX_IDEMPOTENCY_KEY_LENGTH = 255

ID_PATTERN = rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}"  # every path parameter (the OpenAPI document too)
_ID = re.compile(ID_PATTERN, re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,6}", re.ASCII)


def _kind(param: str) -> str:
    return param.removesuffix("_id").replace("_", " ")


def check_path_params(params: dict[str, Any]) -> None:
    """Every path parameter is an ID: short ASCII letters, digits, '_' and '-'."""
    for name, value in params.items():
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise InvalidRequest(
                f"the {_kind(name)} ID in the path is not valid: IDs are 1 to {MAX_ID_LENGTH} "
                "ASCII letters, digits, '_' or '-' (like prj_… or job_…)"
            )


@dataclass(frozen=True)
class Header:
    """A request header the API reads: `pattern` (full match) says what it accepts."""

    name: str
    pattern: str
    rule: str  # how the error message says what to send
    description: str

    def read(self, req: falcon.Request) -> str | None:
        value = req.get_header(self.name)
        if value is None:
            return None
        if not re.fullmatch(self.pattern, value):
            raise InvalidRequest(f"the {self.name} header must be {self.rule}")
        return value

    def parameter(self) -> dict[str, Any]:
        """The OpenAPI parameter object."""
        return {
            "name": self.name,
            "in": "header",
            "required": False,
            "description": self.description,
            "schema": {"type": "string", "pattern": f"^{self.pattern}$"},
        }


@dataclass(frozen=True)
class QueryInt:
    """A whole-number query parameter in [minimum, maximum], in ASCII digits."""

    name: str
    default: int
    minimum: int
    maximum: int
    description: str

    def read(self, req: falcon.Request) -> int:
        raw = req.get_param(self.name)
        if raw is None:
            return self.default
        if not _DIGITS.fullmatch(raw) or not self.minimum <= int(raw) <= self.maximum:
            raise InvalidRequest(f"{self.name} must be a whole number from {self.minimum} to {self.maximum}")
        return int(raw)

    def parameter(self) -> dict[str, Any]:
        """The OpenAPI parameter object."""
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "description": self.description,
            "schema": {
                "type": "integer",
                "minimum": self.minimum,
                "maximum": self.maximum,
                "default": self.default,
            },
        }


IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    pattern=rf"[\x20-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}",
    rule=f"1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters (a UUID is a good choice)",
    description="Makes a retried request return the job the first one made (same body), or 422.",
)
# Not validated here but honoured when sane (app.observability): the document says what is.
REQUEST_ID = Header(
    "X-Request-ID",
    pattern=r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}",
    rule="1 to 128 letters, digits, '.', '_', ':' or '-'",
    description="Your ID for the request, on every log line about it and in the answer's X-Request-ID "
    "(anything else than 1 to 128 letters, digits, '.', '_', ':' or '-' is replaced by a new ID).",
)
LIMIT = QueryInt("limit", default=25, minimum=1, maximum=100, description="How many, newest first.")


def idempotency_key(req: falcon.Request) -> str | None:
    """The Idempotency-Key header, if sent: 1 to 255 printable ASCII characters."""
    return IDEMPOTENCY_KEY.read(req)


class InputValidation:
    """Falcon middleware: path parameters and the Idempotency-Key header, on every
    authenticated route (the unauthenticated ones, health and the document, read neither)."""

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        if resource is None or not getattr(resource, "auth_required", True):
            return
        check_path_params(params)
        idempotency_key(req)
