"""compose.yaml as Docker Compose reads it, without Docker: YAML (anchors and merge
keys), then variable interpolation as the Compose Specification defines it
(`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`,
`${VAR:+alt}`, `${VAR+alt}`, `$VAR`, and `$$` for a literal `$`).

The Compose Specification's JSON schema (vendored in tests/data/compose-spec.json, see
tests/data/README.md) describes the file after interpolation, so it is validated here
with a Draft 7 validator, the draft the schema declares.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


class InterpolationError(ValueError):
    """A `${VAR:?…}` whose variable is unset, or a `$` Compose cannot read."""


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("bare"):
            return env.get(match.group("bare"), "")
        name = match.group("braced")
        if name is None:
            raise InterpolationError(f"invalid interpolation format in {text!r}")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None or (value is not None and not unset):
            # Set: its value, or for "+" the alternative.
            return _substitute(arg, env) if op and op.endswith("+") else value or ""
        if op.endswith("-"):
            return _substitute(arg, env)
        if op.endswith("?"):
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        return ""  # "+" and unset

    return _VARIABLE.sub(one, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """`node` with every string value interpolated from `env` (mapping keys are left alone)."""
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    return node


def raw(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file's YAML, anchors and merge keys resolved, before interpolation."""
    return yaml.safe_load(path.read_text())


def load(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file as Compose sees it with `env` as the environment (none set by default:
    a fresh checkout without a `.env`)."""
    return interpolate(raw(path), env or {})


def schema_errors(config: Mapping[str, Any]) -> list[str]:
    """Where `config` breaks the Compose Specification's schema ([] when it conforms)."""
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    ]


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """A Compose duration (`45s`, `1m30s`, `500ms`) in seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a Compose duration: {text!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def command_words(service: Mapping[str, Any]) -> list[str]:
    """The service's command as words; a `sh -c SCRIPT` command is split too."""
    command = service.get("command") or []
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["sh", "-c"] and len(words) == 3:
        return ["sh", "-c", *shlex.split(words[2])]
    return words


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's `environment`, as a mapping whichever form the file uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}
