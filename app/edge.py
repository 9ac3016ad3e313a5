"""Validating what a client sends outside the body, before anything reaches the core.

Path parameters, the headers the API reads and the query parameters it accepts are
checked here, so a hostile value (a NUL, a 7,000-character key, a Unicode digit)
answers 400 saying what to fix instead of failing somewhere deeper.
"""

from __future__ import annotations

import re
from typing import Any

import falcon

from pipeline.errors import InvalidRequest

MAX_ID_LENGTH = 64
MAX_IDEMPOTENCY_KEY_LENGTH = 255

_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}", re.ASCII)
_PRINTABLE = re.compile(rf"[\x20-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}")
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


def idempotency_key(req: falcon.Request) -> str | None:
    """The Idempotency-Key header, if sent: 1 to 255 printable ASCII characters."""
    value = req.get_header("Idempotency-Key")
    if value is None:
        return None
    if not _PRINTABLE.fullmatch(value):
        raise InvalidRequest(
            f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII "
            "characters (a UUID is a good choice)"
        )
    return value


def query_int(req: falcon.Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    """A whole-number query parameter in [minimum, maximum], in ASCII digits."""
    raw = req.get_param(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not minimum <= int(raw) <= maximum:
        raise InvalidRequest(f"{name} must be a whole number from {minimum} to {maximum}")
    return int(raw)


class InputValidation:
    """Falcon middleware: path parameters and the Idempotency-Key header, on every route."""

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        if resource is None:
            return
        check_path_params(params)
        idempotency_key(req)
