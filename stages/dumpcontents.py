"""What an uploaded dump contains, read from its table of contents or its first lines.

For custom and tar archives the target's `pg_restore --list` prints the table of
contents (`stages.toc`); it sits at the start of the archive, so the head of an upload
is enough. For plain SQL, pg_dump writes a ``-- Name: …; Type: …;`` comment before
every object, and hand-written scripts are read for their CREATE EXTENSION / LANGUAGE
statements, line by line, never holding the script whole in memory.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from stages import toc
from stages.checks import Findings
from stages.commands import PgTools
from stages.extensions import Extension
from stages.toc import TRUSTED_LANGUAGES, TocEntry

READ_CHUNK = 1024 * 1024
# Decompressed SQL read from a gzip head, at most: the objects that matter come first.
MAX_SQL_TEXT = 256 * 1024 * 1024

# pg_dump's plain-format comment before each object (pg_backup_archiver.c, _printTocEntry).
_SQL_COMMENT = re.compile(
    r"^-- Name: (?P<name>.*?); Type: (?P<kind>[A-Z ]+); Schema: (?P<schema>.*?); Owner: "
)
_CREATE_EXTENSION = re.compile(
    r'^\s*CREATE\s+EXTENSION\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:"(?P<quoted>[^"]+)"|(?P<name>[\w-]+))', re.I
)
_CREATE_LANGUAGE = re.compile(
    r'^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:TRUSTED\s+)?(?:PROCEDURAL\s+)?LANGUAGE\s+"?(?P<name>[\w-]+)', re.I
)
# Untrusted languages ship as extensions of the same name (plperlu, plpython3u...): by
# convention their names end in "u".
KNOWN_UNTRUSTED = frozenset({"plperlu", "plpython3u", "plpythonu", "plpython2u", "pltclu", "pljavau"})


def is_untrusted_extension(name: str) -> bool:
    return name in KNOWN_UNTRUSTED or (name.startswith("pl") and name.endswith("u") and len(name) > 3)


@dataclass
class DumpContents:
    """Objects found in a dump. `complete` is False when only its head was read."""

    extensions: list[str] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)
    table_count: int = 0
    event_triggers: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    untrusted_languages: list[str] = field(default_factory=list)
    large_objects: int = 0
    foreign_servers: list[str] = field(default_factory=list)
    publications: list[str] = field(default_factory=list)
    subscriptions: list[str] = field(default_factory=list)
    complete: bool = True

    def add(self, kind: str, schema: str, name: str) -> None:
        """Record one object of pg_dump kind `kind` (as a TOC or plain comment names it)."""
        if kind == "EXTENSION":
            _append(self.extensions, name)
            if is_untrusted_extension(name):
                _append(self.untrusted_languages, name)
        elif kind == "SCHEMA":
            _append(self.schemas, name)
        elif kind == "TABLE":
            self.table_count += 1
        elif kind == "EVENT TRIGGER":
            _append(self.event_triggers, name)
        elif kind == "PROCEDURAL LANGUAGE":
            _append(self.languages, name)
        elif kind in ("BLOB", "LARGE OBJECT"):
            self.large_objects += 1
        elif kind == "SERVER":
            _append(self.foreign_servers, name)
        elif kind == "PUBLICATION":
            _append(self.publications, name)
        elif kind == "SUBSCRIPTION":
            _append(self.subscriptions, name)

    def findings(self) -> Findings:
        return Findings(
            event_triggers=self.event_triggers,
            untrusted_languages=self.untrusted_languages,
            large_objects=self.large_objects,
            foreign_servers=self.foreign_servers,
            publications=self.publications,
            subscriptions=self.subscriptions,
        )

    def _judge_languages(self) -> DumpContents:
        # A dump does not say whether a language is trusted; judge it by name as the
        # restore does (stages.toc), so the warning names what the restore leaves out.
        for name in self.languages:
            if name not in TRUSTED_LANGUAGES:
                _append(self.untrusted_languages, name)
        return self

    def extension_list(self) -> list[Extension]:
        # A dump does not record extension versions: CREATE EXTENSION takes the default.
        return [Extension(name) for name in self.extensions]


def _append(values: list[str], name: str) -> None:
    if name not in values:
        values.append(name)


def read_toc(entries: Iterable[TocEntry]) -> DumpContents:
    """Contents of an archive from its table of contents."""
    contents = DumpContents()
    for entry in entries:
        contents.add(entry.desc, entry.namespace, entry.name)
    return contents._judge_languages()


def list_archive(tools: PgTools, path: str) -> DumpContents:
    """Contents of the archive at `path`, as the target's `pg_restore --list` reads them."""
    return read_toc(toc.read(tools, path))


def read_sql(lines: Iterable[str], *, complete: bool) -> DumpContents:
    """Contents of a plain SQL script (or its first lines, `complete=False`)."""
    contents = DumpContents(complete=complete)
    for line in lines:
        if line.startswith("-- "):
            match = _SQL_COMMENT.match(line)
            if match:
                contents.add(match.group("kind").strip(), match.group("schema"), match.group("name"))
            continue
        found = _CREATE_EXTENSION.match(line)
        if found:
            _append(contents.extensions, found.group("quoted") or found.group("name"))
            continue
        found = _CREATE_LANGUAGE.match(line)
        if found:
            _append(contents.languages, found.group("name"))
    return contents._judge_languages()


def sql_lines(path: str, *, gzipped: bool, max_text: int = MAX_SQL_TEXT) -> Iterator[str]:
    """The lines of a (possibly gzip-compressed, possibly cut short) SQL file.

    A gzip stream cut anywhere still yields what it holds so far; at most `max_text`
    bytes of text are produced, a chunk at a time, so a small head cannot inflate
    into gigabytes of memory.
    """
    pending = b""
    produced = 0
    with open(path, "rb") as f:
        for chunk in _inflated(f) if gzipped else iter(lambda: f.read(READ_CHUNK), b""):
            chunk = chunk[: max_text - produced]
            produced += len(chunk)
            *whole, pending = (pending + chunk).split(b"\n")
            for line in whole:
                yield line.decode("utf-8", "replace")
            if produced >= max_text:
                return
    if pending:
        yield pending.decode("utf-8", "replace")


def _inflated(f: IO[bytes]) -> Iterator[bytes]:
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    while not inflater.eof:
        data = inflater.unconsumed_tail or f.read(READ_CHUNK)
        if not data:
            return  # cut short: what came before still counts
        try:
            out = inflater.decompress(data, READ_CHUNK)
        except zlib.error:
            return  # damaged past this point: what came before still counts
        if out:
            yield out
