"""Reading JSON request bodies: size, content type and syntax, with clear errors."""

from __future__ import annotations

import json
from typing import Any

import falcon

from pipeline.errors import InvalidRequest


def read_json(req: falcon.Request, *, max_bytes: int, required: bool = True) -> Any:
    """The parsed JSON body, or the HTTP error that says what is wrong with it."""
    length = req.content_length
    if length is not None and length > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"the request body is larger than {max_bytes} bytes")
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"the request body is larger than {max_bytes} bytes")
    if not raw.strip():
        if required:
            raise InvalidRequest("the request needs a JSON body")
        return None
    content_type = (req.content_type or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise falcon.HTTPUnsupportedMediaType(
            description="send the body as JSON with Content-Type: application/json"
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRequest(f"the request body is not valid JSON: {err}") from None
