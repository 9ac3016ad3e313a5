"""How a plain dump was made, judged from its statements: what an import cannot restore,
with the pg_dump options to use instead.

`PlainDumpShape` watches the pieces of `stages.dumps.sqlscript.read_script` (the worker's
filter sees the whole script, the API's preflight its head) and `refusal()` answers
the first reason to refuse it, or None:

- pg_dumpall output (its header, roles, several databases);
- ``pg_dump --create``: CREATE DATABASE or ``\\connect`` (the import creates the database);
- ``pg_dump --clean`` without ``--if-exists``: DROP statements before anything is
  created, which fail on the new, empty database (with ``--if-exists`` they are
  harmless and the dump is imported);
- ``pg_dump --data-only``: rows loaded before any object is created;
- a script cut short (only when the whole script was read): see `Script.cut_short`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stages.dumps.sqlscript import META, STATEMENT, Piece, Script, statement_words

AGAIN = "e.g. pg_dump -Fc -f dump.dump DBNAME, and import that file"
FOOTER_LINE = "-- PostgreSQL database dump complete"

IDENT = rb'(?:"(?:[^"]|"")*"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff-]*)'
_CREATE_EXTENSION = re.compile(
    rb"CREATE\s+EXTENSION\s+(IF\s+NOT\s+EXISTS\s+)?("
    + IDENT
    + rb")(?:\s+WITH)?(?:\s+SCHEMA\s+("
    + IDENT
    + rb"))?",
    re.I,
)
_LANGUAGE = re.compile(
    rb"(CREATE|ALTER|COMMENT\s+ON)\s+(?:OR\s+REPLACE\s+)?(?:TRUSTED\s+)?(?:PROCEDURAL\s+)?LANGUAGE\s+("
    + IDENT
    + rb")",
    re.I,
)
_IF_EXISTS = re.compile(rb"\bIF\s+EXISTS\b", re.I)
_PG_DUMP_RESTRICT = re.compile(rb"\\(?:un)?restrict\s+[A-Za-z0-9]+\s*\Z")


def unquote(identifier: str) -> str:
    if identifier.startswith('"') and identifier.endswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


@dataclass(frozen=True)
class ExtensionStatement:
    """A CREATE EXTENSION statement: pg_dump writes `IF NOT EXISTS name WITH SCHEMA s`."""

    name: str
    schema: str | None
    if_not_exists: bool


def create_extension(statement: bytes) -> ExtensionStatement | None:
    """The extension a statement creates, if it is a CREATE EXTENSION."""
    found = _CREATE_EXTENSION.match(statement)
    if found is None:
        return None
    schema = found.group(3)
    return ExtensionStatement(
        unquote(found.group(2).decode("utf-8", "replace")),
        unquote(schema.decode("utf-8", "replace")) if schema else None,
        found.group(1) is not None,
    )


def language_statement(statement: bytes) -> tuple[str, str] | None:
    """("CREATE" | "ALTER" | "COMMENT ON", language) of a statement about a procedural
    language, else None."""
    found = _LANGUAGE.match(statement)
    if found is None:
        return None
    return " ".join(found.group(1).decode().upper().split()), unquote(
        found.group(2).decode("utf-8", "replace")
    )


def dumpall_message() -> str:
    return (
        "the upload is pg_dumpall output (a whole cluster: roles and several databases), which an "
        f"import cannot restore into one project; dump the one database with pg_dump instead, {AGAIN}"
    )


def cut_short_message(script: Script) -> str:
    """Why `script` (with `cut_short`) is incomplete, and what to do."""
    if script.unfinished is not None:
        why = f"it ends inside {script.unfinished} that starts at line {script.unfinished_line}"
    else:
        why = f"its last line is not '{FOOTER_LINE}', which pg_dump writes at the end of every complete dump"
    return (
        f"the dump is cut short: {why}. Upload the whole file again; if pg_dump itself stopped "
        "early (a full disk, a lost connection), run pg_dump again and upload its output"
    )


def is_pg_dump_restrict(meta: bytes) -> bool:
    """Whether a meta-command line is pg_dump's own `\\restrict KEY` / `\\unrestrict KEY`."""
    return _PG_DUMP_RESTRICT.match(meta.strip()) is not None


class PlainDumpShape:
    """Feed it every piece of a script (`see`); then ask `refusal`."""

    def __init__(self) -> None:
        self.created = False  # a CREATE statement has been seen
        self.create_database: int | None = None
        self.connect: list[int] = []
        # The databases the \connect lines name: pg_dump --create connects to its one
        # database (twice when it sets the database's properties); pg_dumpall to several.
        self.connected_to: set[bytes] = set()
        self.roles: int | None = None
        self.clean: int | None = None
        self.data_only: int | None = None

    def see(self, piece: Piece) -> None:
        if piece.kind == META and not is_pg_dump_restrict(piece.data):
            if re.match(rb"\\(?:c|connect)\b", piece.data):
                self.connect.append(piece.line)
                arguments = piece.data.split()
                self.connected_to.add(arguments[1] if len(arguments) > 1 else b"")
            return
        if piece.kind != STATEMENT or not piece.first:
            return
        words = statement_words(piece.data, 3)
        if not words:
            return
        verb = words[0]
        if verb == "CREATE":
            if words[1:2] == ["DATABASE"] and self.create_database is None:
                self.create_database = piece.line
            elif words[1:2] == ["ROLE"] and self.roles is None:
                self.roles = piece.line
            self.created = True
        elif self.created:
            return
        elif verb in ("COPY", "INSERT") and self.data_only is None:
            self.data_only = piece.line
        elif self.clean is None and not _IF_EXISTS.search(piece.data):
            if verb == "DROP" or (verb == "ALTER" and re.search(rb"\sDROP\s+CONSTRAINT\s", piece.data, re.I)):
                if words[1:2] != ["DATABASE"]:
                    self.clean = piece.line

    def refusal(self, script: Script, *, whole: bool) -> str | None:
        """The first reason to refuse the script, naming the fix; None if there is none.
        `whole` says the script was read to its end (so a missing footer counts)."""
        if script.pg_dumpall_header or self.roles is not None or len(self.connected_to) > 1:
            return dumpall_message()
        if self.create_database is not None or self.connect:
            line = self.create_database if self.create_database is not None else self.connect[0]
            return (
                f"the dump was made with pg_dump --create (-C): at line {line} it creates or connects "
                "to a database of its own, but an import restores only into the new database it "
                f"creates; run pg_dump again without --create (and without --clean), {AGAIN}"
            )
        if self.clean is not None:
            return (
                f"the dump was made with pg_dump --clean (-c) without --if-exists: its DROP statements "
                f"(from line {self.clean}) fail on the new, empty database an import restores into; "
                "run pg_dump again with --clean --if-exists, or without --clean"
            )
        if self.data_only is not None:
            return (
                f"the dump holds data but no schema (pg_dump --data-only, -a): line {self.data_only} "
                "loads rows into a table the dump never creates; run pg_dump again without "
                f"--data-only (and without --section=data), {AGAIN}"
            )
        if whole and script.cut_short:
            return cut_short_message(script)
        return None
