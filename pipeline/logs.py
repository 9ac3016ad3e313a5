"""Logging set-up shared by the API, the worker and the CLI: every line is redacted."""

from __future__ import annotations

import logging

from stages.connections.pgurl import redact


class RedactingFilter(logging.Filter):
    """Masks passwords in URLs and keyword strings in every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure(level: int = logging.INFO) -> None:
    """Redact every handler's output; add a stderr handler only if none exists
    (Dramatiq and gunicorn install their own)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    root.setLevel(level)
    for noisy in ("pika", "peewee"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
