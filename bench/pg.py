"""The benchmark's Postgres: one admin URL, databases made and dropped, commands run.

Every database the bench makes is named `capybench_…` so it never collides with the
tests' (`capy_…`, `capysrc_…`) on a shared cluster.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class CommandFailed(RuntimeError):
    """An external command (pg_dump, pg_restore, pgcopydb, psql) exited non-zero."""

    def __init__(self, argv: Sequence[str], exit_code: int, stderr_tail: str):
        self.argv, self.exit_code, self.stderr_tail = list(argv), exit_code, stderr_tail
        super().__init__(f"{Path(argv[0]).name} exited with {exit_code}: {stderr_tail.strip()[-2000:]}")


@dataclass(frozen=True)
class Cluster:
    """The cluster the sources and every target live on, reached as a superuser."""

    admin_url: str = DEFAULT_ADMIN_URL

    def url(self, dbname: str, **query: str) -> str:
        base = self.admin_url.split("?", 1)[0].rsplit("/", 1)[0] + "/" + dbname
        return base + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")

    def query(self, text: str | sql.Composed, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        conn = psycopg2.connect(self.url(dbname))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(text, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def exists(self, dbname: str) -> bool:
        return bool(self.query("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)))

    def create(self, dbname: str) -> str:
        self.query(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(dbname))
        )
        return dbname

    def drop(self, dbname: str) -> None:
        self.query(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))

    def size(self, dbname: str) -> int:
        return int(self.query("SELECT pg_database_size(%s)", (dbname,))[0][0])

    def server_version(self) -> str:
        return str(self.query("SHOW server_version")[0][0])

    def psql(self, dbname: str, script: str) -> None:
        """Run `script` with psql in autocommit, stopping at the first error."""
        run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url(dbname)], stdin_text=script)


def run(argv: Sequence[str], *, stdin_text: str | None = None, timeout: float | None = None) -> None:
    """Run `argv` (no shell); raise CommandFailed with the tail of stderr if it fails."""
    done = subprocess.run(
        list(argv),
        input=stdin_text,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr[-4000:])
