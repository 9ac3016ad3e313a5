"""An archive's table of contents (`pg_restore --list`), and what a managed target
restores of it.

The restore runs as the project's own role, not as a superuser. Entries that only a
superuser (or an object's owner) may restore are left out with a reason the report
shows; extensions and their schemas are created by the service beforehand, so their
entries are left out too.
"""

from __future__ import annotations

import codecs
import io
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from stages.tools.commands import PgTools

# "3302; 3466 73077 EVENT TRIGGER - et postgres": id; catalog oid, desc, namespace, rest.
_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.+)$")

# Descriptions pg_restore uses, longest first so "MATERIALIZED VIEW DATA" wins over "VIEW".
_DESCS = sorted(
    [
        "ACCESS METHOD",
        "AGGREGATE",
        "BLOB",
        "BLOB METADATA",
        "BLOBS",
        "CAST",
        "CHECK CONSTRAINT",
        "COLLATION",
        "COMMENT",
        "CONSTRAINT",
        "CONVERSION",
        "DATABASE",
        "DATABASE PROPERTIES",
        "DEFAULT",
        "DEFAULT ACL",
        "DOMAIN",
        "ENCODING",
        "EVENT TRIGGER",
        "EXTENSION",
        "FK CONSTRAINT",
        "FOREIGN DATA WRAPPER",
        "FOREIGN SERVER",
        "FOREIGN TABLE",
        "FUNCTION",
        "INDEX",
        "INDEX ATTACH",
        "LARGE OBJECT",
        "MATERIALIZED VIEW",
        "MATERIALIZED VIEW DATA",
        "OPERATOR",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "POLICY",
        "PROCEDURAL LANGUAGE",
        "PROCEDURE",
        "PUBLICATION",
        "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA",
        "ROW SECURITY",
        "RULE",
        "SCHEMA",
        "SEARCHPATH",
        "SECURITY LABEL",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "SEQUENCE SET",
        "SERVER",
        "SHELL TYPE",
        "STATISTICS",
        "STDSTRINGS",
        "SUBSCRIPTION",
        "SUBSCRIPTION TABLE",
        "TABLE",
        "TABLE ATTACH",
        "TABLE DATA",
        "TEXT SEARCH CONFIGURATION",
        "TEXT SEARCH DICTIONARY",
        "TEXT SEARCH PARSER",
        "TEXT SEARCH TEMPLATE",
        "TRANSFORM",
        "TRIGGER",
        "TYPE",
        "USER MAPPING",
        "VIEW",
        "ACL",
    ],
    key=len,
    reverse=True,
)

TRUSTED_LANGUAGES = {"plpgsql", "sql", "c", "internal", "plperl", "pltcl", "plv8", "plrust"}

# What a non-superuser database owner cannot restore, and why.
SUPERUSER_ONLY = {
    "EVENT TRIGGER": "event triggers need superuser, which a managed database does not grant",
    "SUBSCRIPTION": "subscriptions need superuser; recreate them after the import if needed",
    "SUBSCRIPTION TABLE": "subscriptions need superuser; recreate them after the import if needed",
    "FOREIGN DATA WRAPPER": "foreign data wrappers need superuser",
    "USER MAPPING": "user mappings hold credentials of the source's roles and are not imported",
}


# (pg_class oid of the system catalog, oid of the object in it), e.g. (1259, 16384).
CatalogId = tuple[int, int]


@dataclass(frozen=True)
class TocEntry:
    line: str
    dump_id: int
    desc: str
    namespace: str
    name: str

    @property
    def catalog_id(self) -> CatalogId:
        """The object's (catalog oid, oid) on the source, as pg_dump recorded it: what
        names it unambiguously (names in the listing are not quoted)."""
        match = _LINE.match(self.line)
        return (int(match.group(2)), int(match.group(3))) if match else (0, 0)

    @property
    def label(self) -> str:
        where = f"{self.namespace}." if self.namespace not in ("-", "") else ""
        return f"{self.desc} {where}{self.name}"


def parse(listing: str) -> list[TocEntry]:
    entries = []
    for line in listing.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        rest = match.group(4)
        desc = next((d for d in _DESCS if rest.startswith(d + " ")), rest.split(" ", 1)[0])
        namespace, _, name_owner = rest[len(desc) + 1 :].partition(" ")
        # The owner, when present, is the last word; names may contain spaces.
        name = name_owner.rsplit(" ", 1)[0] if " " in name_owner.strip() else name_owner.strip()
        entries.append(TocEntry(line, int(match.group(1)), desc, namespace, name.strip()))
    return entries


@dataclass
class RestorePlan:
    keep: list[TocEntry]
    skipped: list[dict[str, str]]
    extensions: list[str]

    def list_file(self) -> str:
        return "\n".join(entry.line for entry in self.keep) + "\n"


def plan(
    entries: list[TocEntry],
    *,
    precreated_schemas: set[str],
    skip: Mapping[tuple[str, str, str], str] | None = None,
) -> RestorePlan:
    """Split the TOC into what the project role restores and what it skips (with why).
    `skip`: (desc, namespace, name) -> reason, what preflight's schema rehearsal found
    the project cannot hold (stages.preflight.rehearsal)."""
    skip = skip or {}
    keep: list[TocEntry] = []
    skipped: list[dict[str, str]] = []
    extensions = [e.name for e in entries if e.desc == "EXTENSION"]
    for entry in entries:
        reason = None
        if entry.desc in SUPERUSER_ONLY:
            reason = SUPERUSER_ONLY[entry.desc]
        elif (entry.desc, entry.namespace, entry.name) in skip:
            reason = skip[(entry.desc, entry.namespace, entry.name)]
        elif entry.desc == "PROCEDURAL LANGUAGE" and entry.name not in TRUSTED_LANGUAGES:
            reason = f"the untrusted language {entry.name} needs superuser"
        elif entry.desc == "COMMENT" and entry.name.startswith("EXTENSION "):
            continue  # applied by the service, which owns the extensions (see extension_comments)
        elif entry.desc == "COMMENT" and entry.name.startswith(("EVENT TRIGGER ", "SUBSCRIPTION ")):
            reason = "the object it comments on needs superuser and was skipped"
        elif entry.desc == "EXTENSION":
            continue  # created by the service before the restore, not skipped
        elif entry.desc == "SCHEMA" and entry.name in precreated_schemas:
            continue  # created by the service (for an extension), owned by the project role
        if reason:
            skipped.append({"object": entry.label, "reason": reason})
        else:
            keep.append(entry)
    return RestorePlan(keep, skipped, extensions)


# Object kinds of the verification report, by TOC description.
KIND_OF_DESC = {
    "TABLE": "tables",
    "INDEX": "indexes",
    "CONSTRAINT": "constraints",
    "FK CONSTRAINT": "constraints",
    "CHECK CONSTRAINT": "constraints",
    "VIEW": "views",
    "MATERIALIZED VIEW": "materialized_views",
    "FUNCTION": "functions",
    "PROCEDURE": "functions",
    "AGGREGATE": "functions",
    "TRIGGER": "triggers",
    "TYPE": "types",
    "DOMAIN": "domains",
    "POLICY": "policies",
    "BLOB": "large_objects",
    "LARGE OBJECT": "large_objects",
    "SEQUENCE": "sequences",
    "SCHEMA": "schemas",
    "EXTENSION": "extensions",
}


def kind_counts(entries: list[TocEntry]) -> dict[str, int]:
    counts = Counter(KIND_OF_DESC[e.desc] for e in entries if e.desc in KIND_OF_DESC)
    return dict(sorted(counts.items()))


_CREATE_EXTENSION = re.compile(
    r"^CREATE EXTENSION IF NOT EXISTS (\"(?:[^\"]|\"\")*\"|\S+) WITH SCHEMA (\"(?:[^\"]|\"\")*\"|\S+);$", re.M
)


def unquote(identifier: str) -> str:
    if identifier.startswith('"') and identifier.endswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


def python_codec(encoding: str) -> str:
    """Python's codec for a PostgreSQL encoding name (LATIN1, WIN1252, EUC_JP…);
    utf-8 for UTF8, SQL_ASCII and any name Python does not know."""
    name = encoding.upper()
    special = {
        "SQL_ASCII": "utf-8",
        "SJIS": "shift_jis",
        "UHC": "cp949",
        "KOI8R": "koi8_r",
        "KOI8U": "koi8_u",
    }
    candidates = [special.get(name, ""), "cp" + name[3:] if name.startswith("WIN") else "", name.lower()]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return codecs.lookup(candidate).name
        except LookupError:
            continue
    return "utf-8"


class Utf8Lines:
    """A byte stream in `codec` read as UTF-8 lines (`readline(limit)` as a binary
    stream has it): what a dump in the source's encoding says, in the target's."""

    def __init__(self, stream: IO[bytes], codec: str) -> None:
        self._text = io.TextIOWrapper(stream, encoding=codec, errors="replace", newline="")

    def readline(self, limit: int = -1) -> bytes:
        return self._text.readline(limit).encode("utf-8")

    def read(self, size: int = -1) -> bytes:
        """Up to `size` characters, as UTF-8 bytes (b"" at the end)."""
        return self._text.read(size).encode("utf-8")


def read(tools: PgTools, archive: str, *, encoding: str = "UTF8") -> list[TocEntry]:
    """The archive's TOC, as the target's pg_restore reads it. pg_restore prints names
    as the archive holds them, in the source's `encoding` (see
    stages.dumps.archivecheck.encoding_of); they are decoded from it."""
    chunks: list[bytes] = []
    pg_restore = tools.pg_restore
    pg_restore.run_streaming(
        ["--list", archive],
        lambda out: chunks.append(out.read()),
        what="reading the dump's table of contents",
    )
    return parse(b"".join(chunks).decode(python_codec(encoding), "replace"))


def is_database_entry(entry: TocEntry, database: str) -> bool:
    """An entry pg_restore restores, and lists, only with `--create`: the database
    `database` itself, its properties (ALTER DATABASE … SET), and a comment, ACL or
    security label on it (tagged "DATABASE <its name>", quoted or not, with no schema:
    a listing line's words cannot tell a schema named "a DATABASE b" apart otherwise)."""
    if entry.namespace != "-":
        return False
    if entry.desc in ("DATABASE", "DATABASE PROPERTIES"):
        return True
    tags = {f"DATABASE {database}", 'DATABASE "{}"'.format(database.replace('"', '""'))}
    return entry.desc in ("COMMENT", "ACL", "SECURITY LABEL") and entry.name in tags


def read_with_database(
    tools: PgTools, archive: str, *, encoding: str = "UTF8"
) -> tuple[list[TocEntry], list[TocEntry]]:
    """`read`'s entries and, apart, the database's own (`is_database_entry`), from one
    `pg_restore --list --create` instead of a listing with and one without it."""
    chunks: list[bytes] = []
    tools.pg_restore.run_streaming(
        ["--list", "--create", archive],
        lambda out: chunks.append(out.read()),
        what="reading the dump's table of contents",
    )
    entries = parse(b"".join(chunks).decode(python_codec(encoding), "replace"))
    named = [e.name for e in entries if e.desc == "DATABASE" and e.namespace == "-"]
    if len(named) != 1:  # no database entry to tell its own by: list it as pg_restore does
        return read(tools, archive, encoding=encoding), [e for e in entries if e.desc.startswith("DATABASE")]
    own = [is_database_entry(e, named[0]) for e in entries]
    return [e for e, is_own in zip(entries, own, strict=True) if not is_own], [
        e for e, is_own in zip(entries, own, strict=True) if is_own
    ]


def render(
    tools: PgTools,
    archive: str,
    wanted: list[TocEntry],
    work_dir: str,
    name: str,
    *,
    encoding: str = "UTF8",
    options: Sequence[str] = (),
) -> str:
    """The SQL of some TOC entries, as pg_restore would run it with `options` (e.g.
    `--section=post-data`; nothing is executed), decoded from the archive's `encoding`."""
    if not wanted:
        return ""
    list_path = os.path.join(work_dir, f"{name}.list")
    with open(list_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(e.line for e in wanted) + "\n")
    chunks: list[bytes] = []
    tools.pg_restore.run_streaming(
        [*options, f"--use-list={list_path}", "--file=-", archive],
        lambda out: chunks.append(out.read()),
        what=f"reading the dump's {name}",
    )
    return b"".join(chunks).decode(python_codec(encoding), "replace")


_COMMENT_ON_EXTENSION = re.compile(
    r"^COMMENT ON EXTENSION (\"(?:[^\"]|\"\")*\"|\S+) IS '((?:[^']|'')*)';$", re.M | re.S
)


def extension_schemas(tools: PgTools, archive: str, entries: list[TocEntry], work_dir: str) -> dict[str, str]:
    """Extension name -> schema, from the archive's own CREATE EXTENSION statements."""
    text = render(tools, archive, [e for e in entries if e.desc == "EXTENSION"], work_dir, "extensions")
    return {unquote(name): unquote(schema) for name, schema in _CREATE_EXTENSION.findall(text)}


def extension_comments(
    tools: PgTools, archive: str, entries: list[TocEntry], work_dir: str, *, encoding: str = "UTF8"
) -> dict[str, str]:
    """Extension name -> comment text. Only the service (the extensions' owner) may set
    them; the text is parsed strictly and re-issued as a parameter, never run as SQL."""
    wanted = [e for e in entries if e.desc == "COMMENT" and e.name.startswith("EXTENSION ")]
    text = render(tools, archive, wanted, work_dir, "extension comments", encoding=encoding)
    return {unquote(name): body.replace("''", "'") for name, body in _COMMENT_ON_EXTENSION.findall(text)}
