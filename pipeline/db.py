"""The control database: one Peewee proxy, initialised at the edge from Settings."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

import peewee
from playhouse.postgres_ext import PostgresqlExtDatabase

database = peewee.DatabaseProxy()


def connect_params(url: str) -> tuple[str, dict]:
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql"):
        raise ValueError("CAPY_DATABASE_URL must be a postgres:// URL")
    params = {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": unquote(parsed.username or "postgres"),
    }
    if parsed.password:
        params["password"] = unquote(parsed.password)
    return unquote(parsed.path.lstrip("/")) or "capy_imports", params


def init_database(url: str) -> PostgresqlExtDatabase:
    """Point the proxy at the control database (no connection is opened here)."""
    name, params = connect_params(url)
    db = PostgresqlExtDatabase(name, connect_timeout=5, application_name="capy-imports", **params)
    database.initialize(db)
    return db
