"""Counting the rows a dump holds, table by table, from its COPY data.

For an upload there is no live source to count, so the dump itself is the source:
every `COPY <table> (...) FROM stdin;` block is counted line by line up to its `\\.`.
Tables a dump fills with INSERT statements (pg_dump --inserts) cannot be counted
exactly this way; they are reported as `uncounted` and only their presence is checked.
"""

from __future__ import annotations

import re
from typing import IO

from stages.commands import PgTools
from stages.errors import CommandTimedOut, PermanentCommandFailure
from stages.toc import Utf8Lines, python_codec

_COPY = re.compile(rb'^COPY ((?:"(?:[^"]|"")*"|[^\s."(]+)\.(?:"(?:[^"]|"")*"|[^\s."(]+)) .*FROM stdin;\r?\n$')
_INSERT = re.compile(rb'^INSERT INTO ((?:"(?:[^"]|"")*"|[^\s."(]+)\.(?:"(?:[^"]|"")*"|[^\s."(]+)) ')
_END = re.compile(rb"^\\\.\r?\n$")
_SETVAL = re.compile(rb"^SELECT pg_catalog\.setval\('((?:[^']|'')+)', (-?\d+), (true|false)\);\r?\n$")
# Statement starts of a plain dump, by report kind (archives use their TOC instead).
_KINDS = [
    (re.compile(rb"^CREATE (UNLOGGED |FOREIGN )?TABLE "), "tables"),
    (re.compile(rb"^CREATE (UNIQUE )?INDEX "), "indexes"),
    (re.compile(rb"^    ADD CONSTRAINT "), "constraints"),
    (re.compile(rb"^CREATE (OR REPLACE )?VIEW "), "views"),
    (re.compile(rb"^CREATE MATERIALIZED VIEW "), "materialized_views"),
    (re.compile(rb"^CREATE (OR REPLACE )?(FUNCTION|PROCEDURE|AGGREGATE) "), "functions"),
    (re.compile(rb"^CREATE (CONSTRAINT )?TRIGGER "), "triggers"),
    (re.compile(rb"^CREATE TYPE "), "types"),
    (re.compile(rb"^CREATE DOMAIN "), "domains"),
    (re.compile(rb"^CREATE POLICY "), "policies"),
    (re.compile(rb"^SELECT pg_catalog\.lo_create\("), "large_objects"),
    (re.compile(rb"^CREATE SEQUENCE "), "sequences"),
    (re.compile(rb"^CREATE SCHEMA "), "schemas"),
    (re.compile(rb"^CREATE EXTENSION "), "extensions"),
]
_PART = re.compile(r'"((?:[^"]|"")*)"|([^."]+)')


def table_key(qualified: bytes) -> str:
    """The inventory's "schema.table" key for a qualified name as pg_dump writes it,
    with quoted identifiers unquoted (doubled quotes become one)."""
    text = qualified.decode("utf-8", "replace")
    parts = []
    for match in _PART.finditer(text):
        quoted, plain = match.group(1), match.group(2)
        parts.append(quoted.replace('""', '"') if quoted is not None else plain)
    return ".".join(parts)


class RowCounter:
    """Feed it a dump's lines (in pieces, each flagged as starting a line or not)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.uncounted: set[str] = set()
        self.sequences: dict[str, int | None] = {}
        self.kinds: dict[str, int] = {}
        self._table: str | None = None

    def feed(self, piece: bytes, at_line_start: bool) -> None:
        if not at_line_start:
            return
        if self._table is not None:
            if _END.match(piece):
                self._table = None
            else:
                self.counts[self._table] += 1
            return
        if piece.startswith(b"COPY "):
            match = _COPY.match(piece)
            if match:
                self._table = table_key(match.group(1))
                self.counts.setdefault(self._table, 0)
        elif piece.startswith(b"INSERT INTO "):
            match = _INSERT.match(piece)
            if match:
                self.uncounted.add(table_key(match.group(1)))
        elif piece.startswith(b"SELECT pg_catalog.setval("):
            match = _SETVAL.match(piece)
            if match:
                # The literal is a regclass: 'public."Mixed"' (quotes doubled inside).
                name = table_key(match.group(1).replace(b"''", b"'"))
                self.sequences[name] = int(match.group(2)) if match.group(3) == b"true" else None
        for pattern, kind in _KINDS:
            if pattern.match(piece):
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                break

    def result(self) -> tuple[dict[str, int], list[str]]:
        uncounted = sorted(self.uncounted)
        return {t: n for t, n in self.counts.items() if t not in self.uncounted}, uncounted


def count_stream(stream: IO[bytes], counter: RowCounter, piece_bytes: int = 1024 * 1024) -> None:
    at_line_start = True
    while True:
        piece = stream.readline(piece_bytes)
        if not piece:
            return
        counter.feed(piece, at_line_start)
        at_line_start = piece.endswith(b"\n")


def count_archive_rows(tools: PgTools, archive: str, counter: RowCounter, *, encoding: str = "UTF8") -> None:
    """Rows per table and sequence values of a custom or tar archive, from
    `pg_restore --data-only` output (in the source's `encoding`), into `counter`."""
    pg_restore = tools.pg_restore
    codec = python_codec(encoding)
    try:
        pg_restore.run_streaming(
            ["--data-only", "--file=-", archive],
            lambda stdout: count_stream(stdout if codec == "utf-8" else Utf8Lines(stdout, codec), counter),  # type: ignore[arg-type]
            what="reading the dump's table data",
        )
    except CommandTimedOut:
        raise  # its message says which limit was reached
    except PermanentCommandFailure as err:
        raise err.with_message(f"the archive's table data is damaged or truncated: {err.message}") from err
