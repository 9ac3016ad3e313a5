"""What an uploaded dump contains, read from its table of contents or its first lines.

For custom and tar archives the target's `pg_restore --list` prints the table of
contents (`stages.dumps.toc`); it sits at the start of the archive, so the head of an upload
is enough. For plain SQL, pg_dump writes a ``-- Name: …; Type: …;`` comment before
every object, and hand-written scripts are read for their CREATE EXTENSION / LANGUAGE
statements, never holding the script whole in memory.

Reading a plain script is bounded and linear whatever it holds, since the API's
preflight reads uploads in the web process: at most `max_text` bytes of text come out
of a gzip stream (a bomb stops there), only the first `MAX_LINE` bytes of a line are
looked at (a 30 MB line is skipped, not joined a chunk at a time), and the file scan
hands only lines that can matter to the per-line patterns, found by one C-level regex
pass, instead of running Python code for each of millions of tiny lines.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from stages.dumps import toc
from stages.dumps.plaindump import PlainDumpShape, create_extension, cut_short_message, language_statement
from stages.dumps.sqlscript import FOOTER, SPACE, STATEMENT, Piece, Script, ScriptError, read_script
from stages.dumps.toc import TRUSTED_LANGUAGES, TocEntry
from stages.preflight.extensions import Extension
from stages.preflight.report import Findings
from stages.tools.commands import PgTools

READ_CHUNK = 1024 * 1024
# Decompressed SQL read from a gzip head, at most: the objects that matter come first.
MAX_SQL_TEXT = 64 * 1024 * 1024
# What is looked at of one line: every statement we recognise starts a line and names
# its object within a few hundred bytes.
MAX_LINE = 64 * 1024
# Lines handed to the per-line patterns, at most: a real dump has one comment and one
# statement per object; a file made of nothing but "CREATE …" lines stops here.
MAX_STATEMENT_LINES = 200_000

# pg_dump's plain-format comment before each object (pg_backup_archiver.c, _printTocEntry):
# "-- Name: <name>; Type: <KIND>; Schema: <schema>; Owner: <owner>". Parsed with one
# search and a find rather than one regex with two lazy groups, which backtracks
# quadratically on a line repeating "; Type: X; Schema: " without an owner.
_COMMENT_START = "-- Name: "
_COMMENT_KIND = re.compile(r"; Type: (?P<kind>[A-Z ]+); Schema: ")
_COMMENT_OWNER = "; Owner: "
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
    # Why a plain script cannot be imported as it is, naming the fix (see stages.dumps.plaindump).
    refusal: str | None = None
    # The script starts with pg_dump's header, so it must end with pg_dump's footer.
    pg_dump_header: bool = False
    # Bytes of SQL text read, and whether `max_text` stopped the reading.
    text_bytes: int = 0
    text_capped: bool = False
    # Names already in each list: membership in O(1), for dumps naming many objects.
    _seen: dict[str, set[str]] = field(default_factory=dict, compare=False, repr=False)

    def _append(self, attr: str, name: str) -> None:
        values: list[str] = getattr(self, attr)
        seen = self._seen.setdefault(attr, set(values))
        if name not in seen:
            seen.add(name)
            values.append(name)

    def add(self, kind: str, schema: str, name: str) -> None:
        """Record one object of pg_dump kind `kind` (as a TOC or plain comment names it)."""
        if kind == "EXTENSION":
            self._append("extensions", name)
            if is_untrusted_extension(name):
                self._append("untrusted_languages", name)
        elif kind == "SCHEMA":
            self._append("schemas", name)
        elif kind == "TABLE":
            self.table_count += 1
        elif kind == "EVENT TRIGGER":
            self._append("event_triggers", name)
        elif kind == "PROCEDURAL LANGUAGE":
            self._append("languages", name)
        elif kind in ("BLOB", "LARGE OBJECT"):
            self.large_objects += 1
        elif kind == "SERVER":
            self._append("foreign_servers", name)
        elif kind == "PUBLICATION":
            self._append("publications", name)
        elif kind == "SUBSCRIPTION":
            self._append("subscriptions", name)

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
        # restore does (stages.dumps.toc), so the warning names what the restore leaves out.
        for name in self.languages:
            if name not in TRUSTED_LANGUAGES:
                self._append("untrusted_languages", name)
        return self

    def extension_list(self) -> list[Extension]:
        # A dump does not record extension versions: CREATE EXTENSION takes the default.
        return [Extension(name) for name in self.extensions]


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
    """Contents of a plain SQL script given as lines (or its first lines, `complete=False`)."""
    text = "".join(line + "\n" for line in lines).encode()
    return _read_script([text], complete=complete)


# Where a pg_dump object comment starts, among the comment lines between statements.
_NAME_COMMENT = re.compile(rb"^-- Name: ", re.M)


def read_sql_file(path: str, *, gzipped: bool, complete: bool, max_text: int = MAX_SQL_TEXT) -> DumpContents:
    """Contents of the plain SQL file at `path` (possibly gzipped, possibly cut short:
    `complete=False`), reading at most `max_text` bytes of text."""
    text = _Text(path, gzipped, max_text)
    contents = _read_script(text.chunks(), complete=complete, text=text)
    contents.text_bytes, contents.text_capped = text.produced, text.capped
    contents.complete = complete and not text.capped
    if not contents.complete and contents.refusal and contents.refusal.startswith("the dump is cut short"):
        contents.refusal = None  # only the head was read: the rest may follow
    return contents


# The end of an uncompressed upload that preflight reads besides its head: pg_dump's
# footer and the `\\unrestrict` line after it take a few hundred bytes.
TAIL_BYTES = 64 * 1024


def read_tail(contents: DumpContents, tail_path: str) -> None:
    """Judge the end of an uncompressed pg_dump script whose head `contents` describes
    (read cheaply with a ranged GET of its last `TAIL_BYTES`): without pg_dump's footer
    it is cut short, and `contents.refusal` says so. A gzip stream's end cannot be read
    without the whole stream, so compressed uploads are checked whole by the worker,
    before anything is restored."""
    if contents.refusal or not contents.pg_dump_header:
        return
    with open(tail_path, "rb") as f:
        tail = f.read(TAIL_BYTES)
    if not FOOTER.search(tail):
        contents.refusal = cut_short_message(Script(pg_dump_header=True))


def _read_script(chunks: Iterable[bytes], *, complete: bool, text: _Text | None = None) -> DumpContents:
    contents = DumpContents(complete=complete)
    script = Script()
    shape = PlainDumpShape()
    budget = MAX_STATEMENT_LINES
    unreadable = None
    try:
        for piece in read_script(chunks, script):
            shape.see(piece)
            if piece.first and _read_piece(contents, piece):
                budget -= 1
                if budget == 0:
                    if text is not None:
                        text.capped = True
                    contents.complete = False
                    break
    except ScriptError as err:  # the same words as the worker's (stages.dumps.plainsql)
        unreadable = f"the SQL script cannot be read as psql reads it: {err}"
    contents.refusal = unreadable or shape.refusal(
        script, whole=complete and budget > 0 and not (text and text.capped)
    )
    contents.pg_dump_header = script.pg_dump_header
    return contents._judge_languages()


def _read_piece(contents: DumpContents, piece: Piece) -> bool:
    """Note what a piece says; True if it was looked at (it counts to the budget)."""
    if piece.kind == SPACE:
        found = False
        for match in _NAME_COMMENT.finditer(piece.data):
            start = match.start()
            end = piece.data.find(b"\n", start, start + MAX_LINE)
            line = piece.data[start : end if end >= 0 else start + MAX_LINE]
            comment = _comment(line.decode("utf-8", "replace").rstrip("\r"))
            if comment:
                contents.add(*comment)
            found = True
        return found
    if piece.kind != STATEMENT:
        return False
    head = piece.data[:MAX_LINE]
    extension = create_extension(head)
    if extension:
        contents._append("extensions", extension.name)
        return True
    about_language = language_statement(head)
    if about_language and about_language[0] == "CREATE":
        contents._append("languages", about_language[1])
        return True
    return False


def _comment(line: str) -> tuple[str, str, str] | None:
    """(kind, schema, name) of a pg_dump object comment line, else None."""
    if not line.startswith(_COMMENT_START):
        return None
    kind = _COMMENT_KIND.search(line, len(_COMMENT_START))
    if kind is None:
        return None
    owner = line.find(_COMMENT_OWNER, kind.end())
    if owner < 0:
        return None
    return kind.group("kind").strip(), line[kind.end() : owner], line[len(_COMMENT_START) : kind.start()]


def sql_lines(path: str, *, gzipped: bool, max_text: int = MAX_SQL_TEXT) -> Iterator[str]:
    """The lines of a (possibly gzip-compressed, possibly cut short) SQL file, each cut
    to its first `MAX_LINE` bytes.

    A gzip stream cut anywhere still yields what it holds so far; at most `max_text`
    bytes of text are produced, a chunk at a time, so a small head cannot inflate
    into gigabytes of memory. Linear in the text read, whatever its line lengths.
    """
    for block in _line_blocks(_Text(path, gzipped, max_text).chunks()):
        lines = block.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the block ended with its last line's newline
        for line in lines:
            yield line[:MAX_LINE].decode("utf-8", "replace")


class _Text:
    """The text of a file, gunzipped if asked, in chunks; at most `max_text` bytes."""

    def __init__(self, path: str, gzipped: bool, max_text: int) -> None:
        self.path = path
        self.gzipped = gzipped
        self.max_text = max_text
        self.produced = 0
        self.capped = False

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for chunk in _inflated(f) if self.gzipped else iter(lambda: f.read(READ_CHUNK), b""):
                room = self.max_text - self.produced
                if room <= 0 or len(chunk) > room:
                    self.capped = True  # more text follows what we take
                    chunk = chunk[: max(0, room)]
                if chunk:
                    self.produced += len(chunk)
                    yield chunk
                if self.capped:
                    return


def _line_blocks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The text again, as blocks of whole lines (the last may lack its newline), with
    every line longer than `MAX_LINE` cut to its first `MAX_LINE` bytes.

    Each byte is copied a bounded number of times: a line that spans chunks is carried
    over only up to `MAX_LINE` bytes, and the rest of it is skipped.
    """
    carry = b""
    skipping = False  # inside the cut-off rest of a long line
    for chunk in chunks:
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            chunk, skipping = chunk[newline + 1 :], False
        last = chunk.rfind(b"\n")
        if last < 0:
            carry += chunk
        else:
            yield carry + chunk[: last + 1]
            carry = chunk[last + 1 :]
        if len(carry) > MAX_LINE:
            yield carry[:MAX_LINE] + b"\n"
            carry, skipping = b"", True
    if carry:
        yield carry


def _inflated(f: IO[bytes]) -> Iterator[bytes]:
    """The gzip stream `f` inflated, member after member (`gzip a; gzip b; cat` makes
    several, as gunzip and the worker read them), in bounded pieces."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    pending = b""
    while True:
        if inflater.eof:
            pending = inflater.unused_data or f.read(READ_CHUNK)
            if not pending:
                return  # the last member ended
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        data = inflater.unconsumed_tail or pending or f.read(READ_CHUNK)
        pending = b""
        if not data:
            return  # cut short: what came before still counts
        try:
            out = inflater.decompress(data, READ_CHUNK)
        except zlib.error:
            return  # damaged past this point: what came before still counts
        if out:
            yield out
