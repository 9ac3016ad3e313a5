"""Logging set-up shared by the API, the worker and the CLI: JSON lines (or text in
development), every line redacted, every line carrying the context it was logged in.

The context is a contextvar: the API binds `request_id` for a request, the runner
binds `job_id`, `stage` and `attempt` while a stage runs, and a tool's output reader
binds `tool` (stages.tools.commands). A thread started while a context is bound sees
it only if it is started in a copy of it (`contextvars.copy_context().run`): the
heartbeat and the tools' output readers are.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import types
from collections.abc import Iterator, Mapping
from typing import Any

from stages.connections.pgurl import redact

JSON = "json"
TEXT = "text"
FORMATS = (JSON, TEXT)

# The fields a line may carry, in the order they are printed: the bound context, then
# what an access line adds (app.observability).
CONTEXT_FIELDS = ("request_id", "job_id", "stage", "attempt", "tool")
ACCESS_FIELDS = ("method", "route", "status", "duration_ms")

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "capy_log_context", default=types.MappingProxyType({})
)

# Credentials of our own that must never reach a log (pgurl.redact covers Postgres
# URLs and keyword strings): API keys, webhook secrets, bearer tokens.
_TOKENS = re.compile(r"\b(capy_live_|whsec_)[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")


# What ends a line for str.splitlines (and so for many log readers) besides "\n": a
# message (a request's path, a tool's output) holding one would forge a line of its own.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    # \u0085, \u2028, \u2029: the escapes JSON strings have too (json.dumps escaped the others).
    return f"\\u{ord(char):04x}" if ord(char) > 0x7F else char.encode("unicode_escape").decode("ascii")


def one_line(text: str) -> str:
    """`text` with every line break escaped (`\\n`, `\\u2028`…)."""
    return _LINE_BREAKS.sub(_escape, text)


def scrub(text: str) -> str:
    """`text` with every password and token this service knows of masked."""
    if not text:
        return text
    return _BEARER.sub(r"\1***", _TOKENS.sub(r"\1***", redact(text)))


def current() -> Mapping[str, Any]:
    """The fields bound in this context."""
    return _context.get()


def push(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Bind `fields` on top of the current ones; `pop` the token to undo (for hooks
    that cannot use a `with`, such as a middleware's request and response)."""
    return _context.set({**_context.get(), **fields})


def pop(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Every line logged inside carries `fields` (and those bound outside)."""
    token = push(**fields)
    try:
        yield
    finally:
        pop(token)


def bind(**fields: Any) -> None:
    """Add `fields` to the innermost `bound` block (they go when it ends)."""
    _context.set({**_context.get(), **fields})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto the record (a field passed in `extra` wins) and
    redacts its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _fields(record: logging.LogRecord, names: tuple[str, ...] = CONTEXT_FIELDS) -> dict[str, Any]:
    return {name: getattr(record, name) for name in names if getattr(record, name, None) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, pid,
    the bound fields, and `exc_info` as text; everything redacted."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
            "pid": record.process,
        }
        line.update(_fields(record, CONTEXT_FIELDS + ACCESS_FIELDS))
        if record.exc_info:
            line["exc_info"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc_info"] = scrub(record.exc_text)
        if record.stack_info:
            line["stack_info"] = scrub(self.formatStack(record.stack_info))
        # json.dumps escapes "\n" but leaves U+0085, U+2028 and U+2029, which are line
        # breaks to str.splitlines; inside a JSON string their escapes mean the same.
        return one_line(json.dumps(line, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    """The development format: `time LEVEL logger: message [job_id=… stage=…]`, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line (its traceback, added after, is the only continuation).
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields:
            suffix = " ".join(f"{name}={value}" for name, value in fields.items())
            first, _, rest = text.partition("\n")
            text = f"{first} [{suffix}]" + (f"\n{rest}" if rest else "")
        return scrub(text)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == JSON else TextFormatter()


# Loggers with handlers of their own, whose lines should look like ours.
_OWN_HANDLERS = ("gunicorn.error", "gunicorn.access")


def configure(fmt: str = JSON, level: int | str = logging.INFO) -> None:
    """Format (`json` or `text`) and redact every handler's output, from `level` up (a
    number, or a name such as "debug"); add a stderr handler only if none exists
    (Dramatiq's worker processes and gunicorn install their own). May be called again,
    e.g. once the settings are read."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    chosen = formatter(fmt)
    handlers = [*root.handlers, *(h for name in _OWN_HANDLERS for h in logging.getLogger(name).handlers)]
    for handler in handlers:
        handler.setFormatter(chosen)
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for noisy in ("pika", "peewee"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
