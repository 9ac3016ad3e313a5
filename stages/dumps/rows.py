"""Counting the rows a dump holds, table by table, from its COPY data.

For an upload there is no live source to count, so the dump itself is the source:
the script is split by `stages.dumps.sqlscript` (the one reader of plain SQL), and every
`COPY <table> (...) FROM stdin;` block's data lines are counted up to its `\\.`.
Tables a dump fills with INSERT statements (pg_dump --inserts) cannot be counted
exactly this way; they are reported as `uncounted` and only their presence is checked.
Statement kinds and sequence values are read from whole statements, never from lines
inside strings, function bodies or COPY data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import IO

from stages.dumps.archivetoc import ArchiveToc
from stages.dumps.sqlscript import COPY, STATEMENT, Piece, read_script
from stages.dumps.toc import Utf8Lines, python_codec
from stages.errors import CommandTimedOut, PermanentCommandFailure
from stages.tools.commands import PgTools

_NAME = rb'(?:"(?:[^"]|"")*"|[^\s."(]+)'
_QUALIFIED = rb"(" + _NAME + rb"\." + _NAME + rb")"
_COPY = re.compile(rb"COPY " + _QUALIFIED + rb" .*FROM stdin;\Z", re.S)
_INSERT = re.compile(rb"INSERT INTO " + _QUALIFIED + rb" ")
_SETVAL = re.compile(rb"SELECT pg_catalog\.setval\('((?:[^']|'')+)', (-?\d+), (true|false)\);\Z")
_END_MARKER = re.compile(rb"(?:^|\n)\\\.\r?\n?\Z")
# Statement starts of a plain dump, by report kind (archives use their TOC instead).
_KINDS = [
    (re.compile(rb"CREATE (UNLOGGED |FOREIGN )?TABLE "), "tables"),
    (re.compile(rb"CREATE (UNIQUE )?INDEX "), "indexes"),
    (re.compile(rb"ALTER TABLE (?:ONLY )?" + _QUALIFIED + rb"\s+ADD CONSTRAINT "), "constraints"),
    (re.compile(rb"CREATE (OR REPLACE )?VIEW "), "views"),
    (re.compile(rb"CREATE MATERIALIZED VIEW "), "materialized_views"),
    (re.compile(rb"CREATE (OR REPLACE )?(FUNCTION|PROCEDURE|AGGREGATE) "), "functions"),
    (re.compile(rb"CREATE (CONSTRAINT )?TRIGGER "), "triggers"),
    (re.compile(rb"CREATE TYPE "), "types"),
    (re.compile(rb"CREATE DOMAIN "), "domains"),
    (re.compile(rb"CREATE POLICY "), "policies"),
    (re.compile(rb"SELECT pg_catalog\.lo_create\("), "large_objects"),
    (re.compile(rb"CREATE SEQUENCE "), "sequences"),
    (re.compile(rb"CREATE SCHEMA "), "schemas"),
    (re.compile(rb"CREATE EXTENSION "), "extensions"),
]
_PART = re.compile(r'"((?:[^"]|"")*)"|([^."]+)')


_CLIENT_ENCODING = re.compile(rb"SET\s+client_encoding\s*(?:=|TO)\s*'([A-Za-z0-9_]+)'\s*;\Z", re.I)


def table_key(qualified: bytes, codec: str = "utf-8") -> str:
    """The inventory's "schema.table" key for a qualified name as pg_dump writes it (in
    the script's client encoding, `codec`), with quoted identifiers unquoted (doubled
    quotes become one)."""
    text = qualified.decode(codec, "replace")
    parts = []
    for match in _PART.finditer(text):
        quoted, plain = match.group(1), match.group(2)
        parts.append(quoted.replace('""', '"') if quoted is not None else plain)
    return ".".join(parts)


class RowCounter:
    """Show it a script's pieces (`see`), as `stages.dumps.sqlscript.read_script` yields them."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.uncounted: set[str] = set()
        self.sequences: dict[str, int | None] = {}
        self.kinds: dict[str, int] = {}
        self._table: str | None = None
        # The script's names are in its client encoding (pg_dump writes
        # `SET client_encoding = 'LATIN1';` for a LATIN1 database, or with --encoding).
        self.codec = "utf-8"
        # False when the script was already turned into UTF-8 (pg_restore's output of
        # an archive, see count_archive_rows): its SET client_encoding no longer holds.
        self.follows_client_encoding = True

    def see(self, piece: Piece) -> None:
        if piece.kind == COPY:
            if self._table is not None:
                rows = piece.data.count(b"\n")
                if piece.last and _END_MARKER.search(piece.data[-4:]):
                    rows -= piece.data.endswith(b"\n")  # the "\\." line is no row
                elif piece.last and not piece.data.endswith(b"\n"):
                    rows += 1  # a last row without its newline (a script cut short)
                self.counts[self._table] += rows
                if piece.last:
                    self._table = None
            return
        if piece.kind != STATEMENT or not piece.first:
            return
        text = piece.data
        if (
            self.follows_client_encoding
            and text[:4].upper() == b"SET "
            and (encoding := _CLIENT_ENCODING.match(text))
        ):
            self.codec = python_codec(encoding.group(1).decode())
        if text.startswith(b"COPY "):
            match = _COPY.match(text)
            if match:
                self._table = table_key(match.group(1), self.codec)
                self.counts.setdefault(self._table, 0)
        elif text.startswith(b"INSERT INTO "):
            match = _INSERT.match(text)
            if match:
                self.uncounted.add(table_key(match.group(1), self.codec))
        elif text.startswith(b"SELECT pg_catalog.setval("):
            match = _SETVAL.match(text)
            if match:
                # The literal is a regclass: 'public."Mixed"' (quotes doubled inside).
                name = table_key(match.group(1).replace(b"''", b"'"), self.codec)
                self.sequences[name] = int(match.group(2)) if match.group(3) == b"true" else None
        for pattern, kind in _KINDS:
            if pattern.match(text):
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                break

    def result(self) -> tuple[dict[str, int], list[str]]:
        uncounted = sorted(self.uncounted)
        return {t: n for t, n in self.counts.items() if t not in self.uncounted}, uncounted


def count_stream(stream: IO[bytes] | Utf8Lines, counter: RowCounter, piece_bytes: int = 1024 * 1024) -> None:
    """Count the script `stream` holds (pg_restore's plain output of an archive)."""
    for piece in read_script(iter(lambda: stream.read(piece_bytes), b"")):
        counter.see(piece)


def count_archive_rows(
    tools: PgTools, archive: str, counter: RowCounter, *, encoding: str = "UTF8", list_file: str | None = None
) -> None:
    """Rows per table and sequence values of a custom or tar archive (of the entries of
    `list_file`, if given), from `pg_restore --data-only` output (in the source's
    `encoding`), into `counter`."""
    pg_restore = tools.pg_restore
    codec = python_codec(encoding)
    counter.follows_client_encoding = False  # what it reads is UTF-8 (Utf8Lines)
    try:
        pg_restore.run_streaming(
            ["--data-only", *([f"--use-list={list_file}"] if list_file else []), "--file=-", archive],
            lambda stdout: count_stream(stdout if codec == "utf-8" else Utf8Lines(stdout, codec), counter),
            what="reading the dump's table data",
        )
    except CommandTimedOut:
        raise  # its message says which limit was reached
    except PermanentCommandFailure as err:
        raise err.with_message(f"the archive's table data is damaged or truncated: {err.message}") from err


def archive_sequences(definitions: Iterable[bytes], encoding: str = "UTF8") -> dict[str, int | None]:
    """Sequence values from an archive's SEQUENCE SET entries (their definitions,
    `SELECT pg_catalog.setval('public.s', 42, true);`), as `RowCounter.sequences` has
    them: no need to read the archive's data for them."""
    codec = python_codec(encoding)
    values: dict[str, int | None] = {}
    for definition in definitions:
        match = _SETVAL.match(definition.strip())
        if match:
            name = table_key(match.group(1).replace(b"''", b"'"), codec)
            values[name] = int(match.group(2)) if match.group(3) == b"true" else None
    return values


def dumped_sequences(toc: ArchiveToc) -> dict[str, int | None]:
    """The sequences' values an archive sets (`archive_sequences` of its SEQUENCE SET
    entries): what pg_dump read of them."""
    return archive_sequences(
        (entry.definition or b"" for entry in toc.entries if entry.desc == "SEQUENCE SET"), toc.encoding
    )
