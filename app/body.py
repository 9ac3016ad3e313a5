"""Reading JSON request bodies: size, content type, syntax and shape, with clear errors.

Whatever the body holds, the answer is the parsed value or a 400/413/415 that says what
to fix: deep nesting, huge numbers, NaN, NUL characters and lone surrogates are refused
here rather than failing in the JSON parser or the database. `read_body` then validates
the value with the request's schema (app.schemas), the one the OpenAPI document shows.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import falcon
import pydantic

from pipeline.errors import InvalidRequest

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 30


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_CHARS:
        raise InvalidRequest(f"numbers in the request body must have at most {MAX_NUMBER_CHARS} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS * 2:
        raise InvalidRequest(f"numbers in the request body must have at most {MAX_NUMBER_CHARS} digits")
    return float(text)


def _constant(name: str) -> Any:
    raise InvalidRequest(f"the request body is not valid JSON: {name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: `{"recreate": false, "recreate": true}`
    would otherwise mean whichever came last."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidRequest(f"the request body names {key!r} twice; send each field once")
        seen[key] = value
    return seen


def _check_string(text: str) -> None:
    if "\x00" in text:
        raise InvalidRequest("strings in the request body must not contain NUL (\\u0000) characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "strings in the request body must be valid Unicode: lone surrogates (\\ud800–\\udfff) are refused"
        ) from None


def check_values(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings the database cannot store."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)) and depth > MAX_DEPTH:
            raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_string(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_string(item)


def read_json(req: falcon.Request, *, max_bytes: int, required: bool = True) -> Any:
    """The parsed JSON body, or the HTTP error that says what is wrong with it."""
    length = req.content_length
    if length is not None and length > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"the request body is larger than {max_bytes} bytes")
    # A chunked body has no Content-Length (gunicorn decodes the chunks and ends the
    # stream); anything else without one is empty.
    chunked = "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
    stream = req.stream if length is None and chunked else req.bounded_stream
    raw = stream.read(max_bytes + 1)
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid JSON: it must be UTF-8") from None
    try:
        body = json.loads(
            text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"the request body is not valid JSON: {err}") from None
    except ValueError as err:  # any other value the parser cannot represent
        raise InvalidRequest(f"the request body holds a value that cannot be read: {err}") from None
    check_values(body)
    return body


Model = TypeVar("Model", bound=pydantic.BaseModel)


def read_body(req: falcon.Request, model: type[Model], *, max_bytes: int) -> Model:
    """The JSON body validated by `model`, or a 400 that says what to fix."""
    try:
        return model.model_validate(read_json(req, max_bytes=max_bytes))
    except pydantic.ValidationError as err:
        raise InvalidRequest(explain(err, model)) from None


def explain(err: pydantic.ValidationError, model: type[pydantic.BaseModel]) -> str:
    """One sentence for the first thing to fix: every unknown field at once, else the
    first field in error, else the model's own rule (say, exactly one source)."""
    problems = err.errors(include_url=False, include_input=False)
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}; allowed fields are {', '.join(sorted(model.model_fields))}"
    problem = problems[0]
    if problem["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object"
    if not problem["loc"]:  # a model validator's ValueError: its message is the sentence
        return str(problem.get("ctx", {}).get("error", problem["msg"]))
    name = ".".join(str(part) for part in problem["loc"])
    field = model.model_fields.get(str(problem["loc"][0]))
    if field is not None and field.description and field.description.startswith("Must be "):
        # A field whose only valid value its description names ("Must be true: …").
        return f'"{name}" {field.description[0].lower()}{field.description[1:].rstrip(".")}'
    if problem["type"] in ("bool_type", "bool_parsing"):
        return f'"{name}" must be true or false'
    if problem["type"] == "string_type":
        return f'"{name}" must be a string'
    if problem["type"] == "missing":
        return f'"{name}" is required'
    return f'"{name}": {problem["msg"]}'
