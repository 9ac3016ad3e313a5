"""The one reader of plain-SQL dumps: a psql script split as psql splits it.

`read_script` streams a script (a pg_dump ``-Fp`` output, or any psql script) and yields
`Piece`s that, put back together in order, are the script's bytes unchanged:

- ``STATEMENT``: one SQL statement, from its first token up to and including the `;`
  that ends it as psql sees it: outside single quotes (``'…'``, ``E'…'`` with backslash
  escapes, and every string while ``standard_conforming_strings`` is off), double-quoted
  identifiers, dollar quotes (``$$…$$``, ``$tag$…$tag$``), comments (``--`` and nested
  ``/* */``), parentheses, and the ``BEGIN ATOMIC … END`` body of a function;
- ``COPY``: the data lines of a ``COPY … FROM stdin`` statement, up to and including
  the ``\\.`` line that ends them;
- ``META``: a psql backslash command between statements (``\\connect``, ``\\restrict``…),
  to the end of its line;
- ``SPACE``: whitespace and comments between statements.

A long statement or COPY block comes in several pieces (`first`/`last` say which);
the first piece of a statement holds all of it, or at least its first `HEAD_BYTES`,
which is what any decision about it looks at. Memory is bounded by the chunk being
read plus `HEAD_BYTES` and a `STEP`, whatever the line lengths. The scan is driven by
compiled regexes that jump to the next character that can matter, runs of whitespace
and comment lines and COPY data are passed on in blocks, and pieces are handed on by
offset, so Python runs per token of interest, never per byte or per data line.

`line` is the line of the script (1-based) where a piece starts, for messages in the
user's terms. When the script ends, `Script` says whether it ended cleanly (not inside
a statement, string or COPY block) and whether it carried pg_dump's header and the
footer that ends every complete dump.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

STATEMENT = "statement"
COPY = "copy"
META = "meta"
SPACE = "space"

CHUNK = 1024 * 1024
STEP = 64 * 1024
HEAD_BYTES = 1024 * 1024
BOM = b"\xef\xbb\xbf"

# pg_dump's first and last comments (pg_backup_archiver.c: "PostgreSQL database dump",
# "PostgreSQL database dump complete"), the same in every version since 7.x.
_HEADER = re.compile(rb"^--[ \t]*PostgreSQL database dump[ \t]*\r?$", re.M)
FOOTER = re.compile(rb"^--[ \t]*PostgreSQL database dump complete[ \t]*\r?$", re.M)
_CLUSTER_HEADER = re.compile(rb"^--[ \t]*PostgreSQL database cluster dump[ \t]*\r?$", re.M)

_SPACE = re.compile(rb"[ \t\r\n\f\v]+")
_SPACE_RUN = re.compile(rb"(?:[ \t\r\n\f\v]++|--[^\n]*+\n)++")
# In a statement: the characters after which the state can change.
_STMT_SPECIAL = re.compile(rb"['\"$\-/;()]")
_WORD = re.compile(rb"[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*")
_IDENT_CHAR = re.compile(rb"[A-Za-z0-9_$\x80-\xff]")
_DOLLAR_TAG = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_FUNCTION_START = re.compile(rb"CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE)\b", re.I)
_COPY_FROM_STDIN = re.compile(rb"COPY\b.*\bFROM\s+stdin\b", re.I | re.S)
_STD_STRINGS = re.compile(
    rb"SET\s+(?:SESSION\s+)?standard_conforming_strings\s*(?:=|TO)\s*'?(\w+)'?\s*;\Z", re.I
)
_MENTIONS_STD_STRINGS = re.compile(rb"standard_conforming_strings", re.I)
_RESET_STD_STRINGS = re.compile(rb"RESET\s+standard_conforming_strings\s*;\Z", re.I)
# Statements whose SET clauses are an object's own setting, not the session's.
_PER_OBJECT_SETTING = re.compile(
    rb"(?:CREATE\s+(?:OR\s+REPLACE\s+)?|ALTER\s+)(?:FUNCTION|PROCEDURE|ROUTINE|DATABASE|ROLE|USER)\b", re.I
)
# BEGIN / START TRANSACTION, and COMMIT / END / ROLLBACK / ABORT (group 2: ROLLBACK TO
# a savepoint, which does not end the block).
_TRANSACTION_CONTROL = re.compile(rb"(BEGIN|START|COMMIT|END|ROLLBACK|ABORT)\b(\s+TO\b)?", re.I)
_RESET_ALL = re.compile(rb"(?:RESET|DISCARD)\s+ALL\s*;\Z", re.I)
_SQ_STD = re.compile(rb"'")
_SQ_ESC = re.compile(rb"['\\]")
_DQ = re.compile(rb'"')
_BLOCK = re.compile(rb"/\*|\*/")
_END_OF_COPY = re.compile(rb"\n\\\.\r?\n")


@dataclass(slots=True)
class Piece:
    """A run of the script's bytes; see the module docstring for the kinds."""

    kind: str
    data: bytes
    line: int
    first: bool = True
    last: bool = True


@dataclass
class Script:
    """What the whole scan saw. `unfinished` names where the script stopped (None when
    it ended between statements): a script cut short ends inside something."""

    lines: int = 0
    bytes: int = 0
    pg_dump_header: bool = False
    pg_dumpall_header: bool = False
    footer: bool = False
    unfinished: str | None = None
    unfinished_line: int = 0
    statements: int = 0
    # The line of a last statement without its ";" (psql runs it all the same).
    trailing_statement: int | None = None

    @property
    def cut_short(self) -> bool:
        """True when the script is certainly incomplete: it ends inside a statement or
        COPY data, or it is a pg_dump output without pg_dump's closing footer."""
        return self.unfinished is not None or (self.pg_dump_header and not self.footer)


class ScriptError(Exception):
    """The script cannot be split as psql would (a COPY statement not ending its line)."""


def read_script(
    chunks: Iterable[bytes], script: Script | None = None, *, atomic_bodies: bool = False
) -> Iterator[Piece]:
    """The pieces of the script whose bytes `chunks` yields (of any sizes), in order.

    `script`, if given, is filled in as the scan goes; its end-of-script fields are
    final once the iterator is exhausted.

    `atomic_bodies`: in CREATE FUNCTION/PROCEDURE, only BEGIN ATOMIC opens a body that
    holds semicolons, not any word `begin` (psql's heuristic, which a parameter or a
    column named begin in `RETURN (r).begin;` misleads into reading on to the end of the
    script). For pg_restore's rendering of an archive, whose entries pg_restore sends one
    by one; a script psql will run must be read as psql reads it (the default).
    """
    scanner = _Scanner(iter(chunks), script if script is not None else Script())
    scanner.atomic_bodies = atomic_bodies
    return scanner.pieces()


def statement_words(text: bytes, count: int = 6) -> list[str]:
    """The first `count` words of a statement, upper-cased, with comments skipped:
    enough to say what kind of statement it is (``["ALTER", "TABLE", …]``)."""
    words: list[str] = []
    pos = 0
    while len(words) < count and pos < len(text):
        space = _SPACE.match(text, pos)
        if space:
            pos = space.end()
            continue
        if text.startswith(b"--", pos):
            end = text.find(b"\n", pos)
            pos = len(text) if end < 0 else end + 1
            continue
        if text.startswith(b"/*", pos):
            end = text.find(b"*/", pos)
            pos = len(text) if end < 0 else end + 2
            continue
        word = _WORD.match(text, pos)
        if not word:
            break
        words.append(word.group().decode("utf-8", "replace").upper())
        pos = word.end()
    return words


class _Scanner:
    """The scan's state between chunks. The unread part of the script is `buf[at:]`,
    whose first byte is at line `line`; positions are offsets into `buf`. `_take`
    hands bytes on by moving `at` (no copy of the rest), and drops the bytes before
    `at` once they are a step long; a position held across `_take` is re-derived from
    `at`."""

    def __init__(self, chunks: Iterator[bytes], script: Script) -> None:
        self.chunks = chunks
        self.script = script
        self.buf = b""
        self.at = 0
        self.pending, self.pending_at = memoryview(b""), 0
        self.eof = False
        self.line = 1
        self.std_strings = True
        # Its value when the open transaction block began (None outside one).
        self.transaction_std_strings: bool | None = None
        self.ends_with_newline = True
        self.atomic_bodies = False
        # With atomic_bodies: the statement's last word so far was `begin`.
        self.after_begin = False

    def _more(self) -> bool:
        """Append the next `STEP` bytes to the buffer; False at the end of the script.

        The buffer grows a step at a time, so it stays small however large the chunks
        read are (a long token makes it grow, up to `HEAD_BYTES` and a step)."""
        if self.eof:
            return False
        if self.pending_at >= len(self.pending):
            for chunk in self.chunks:
                if chunk:
                    self.pending, self.pending_at = memoryview(chunk), 0
                    break
            else:
                self.eof = True
                return False
        step = self.pending[self.pending_at : self.pending_at + STEP].tobytes()
        self.pending_at += len(step)
        if self.at >= STEP:
            self.buf, self.at = self.buf[self.at :] + step, 0
        else:
            self.buf += step
        self.script.bytes += len(step)
        return True

    def _take(self, end: int, kind: str, first: bool = True, last: bool = True) -> Piece:
        """`buf[at:end]` as a piece; the unread part starts at `end`."""
        data = self.buf[self.at : end]
        self.at = end
        piece = Piece(kind, data, self.line, first, last)
        newlines = data.count(b"\n")
        if newlines:
            self.line += newlines
            self.script.lines += newlines
        if data:
            self.ends_with_newline = data[-1:] == b"\n"
        return piece

    def _unread(self) -> int:
        return len(self.buf) - self.at

    def _unfinished(self, what: str, line: int) -> None:
        self.script.unfinished, self.script.unfinished_line = what, line

    def pieces(self) -> Iterator[Piece]:
        while self._unread() < len(BOM) and self._more():
            pass
        if self.buf.startswith(BOM):
            yield self._take(len(BOM), SPACE)
        while True:
            if self._unread() < 2 and self._more():
                continue
            at = self.at
            if at >= len(self.buf):
                if not self.ends_with_newline:
                    self.script.lines += 1  # a last line without its newline
                return
            head = self.buf[at : at + 2]
            if head[:1] in b" \t\r\n\f\v" or head == b"--":
                # Whitespace and whole comment lines, as one piece: a dump has millions.
                run = _SPACE_RUN.match(self.buf, at)
                if run is None:
                    yield from self._line_comment()  # a comment whose newline is not read yet
                    continue
                end = run.end()
                if end == len(self.buf) and end - at < STEP and self._more():
                    continue
                if b"PostgreSQL database" in self.buf[at:end]:
                    self._comments(self.buf[at:end])
                yield self._take(end, SPACE)
            elif head == b"/*":
                yield from self._block_comment()
            elif head[:1] == b"\\":
                yield from self._meta()
            else:
                yield from self._statement()

    def _line_comment(self) -> Iterator[Piece]:
        """A `--` comment between statements, with its newline (pg_dump's header and
        footer are such comments)."""
        first = True
        while self.buf.find(b"\n", self.at) < 0 and self._more():
            if self._unread() > HEAD_BYTES:  # an absurdly long comment: pass it on
                yield self._take(len(self.buf), SPACE, first, False)
                first = False
        end = self.buf.find(b"\n", self.at)
        end = len(self.buf) if end < 0 else end + 1
        if first:
            self._comments(self.buf[self.at : end])
        yield self._take(end, SPACE, first, True)

    def _comments(self, text: bytes) -> None:
        """Note pg_dump's header and footer among comment lines between statements."""
        if b"PostgreSQL database" not in text:
            return
        if FOOTER.search(text):
            self.script.footer = True
        if self.script.statements == 0:
            self.script.pg_dump_header |= _HEADER.search(text) is not None
            self.script.pg_dumpall_header |= _CLUSTER_HEADER.search(text) is not None

    def _block_comment(self) -> Iterator[Piece]:
        depth, pos, first, line = 0, self.at, True, self.line
        while True:
            found = _BLOCK.search(self.buf, pos)
            if found is None:
                pos = max(pos, len(self.buf) - 1)  # a "/" or "*" may start the next mark
                if pos - self.at > HEAD_BYTES:
                    yield self._take(pos, SPACE, first, False)
                    first = False
                base = self.at
                if not self._more():
                    self._unfinished("a /* comment */", line)
                    yield self._take(len(self.buf), SPACE, first, True)
                    return
                pos -= base - self.at  # the buffer may have dropped what was handed on
                continue
            depth += 1 if found.group() == b"/*" else -1
            pos = found.end()
            if depth == 0:
                yield self._take(pos, SPACE, first, True)
                return

    def _meta(self) -> Iterator[Piece]:
        """A backslash command: psql reads it to the end of its line."""
        while self.buf.find(b"\n", self.at) < 0 and self._more():
            if self._unread() > HEAD_BYTES:
                raise ScriptError(
                    f"line {self.line}: a psql backslash command longer than {HEAD_BYTES} bytes"
                )
        end = self.buf.find(b"\n", self.at)
        yield self._take(len(self.buf) if end < 0 else end + 1, META)

    def _statement(self) -> Iterator[Piece]:
        """One statement, up to and including its `;`, then its COPY data if any.

        `mode` is what the scan is inside: None (plain SQL), a quote (``'``, ``E``
        for a string with backslash escapes, ``"``), ``$`` (dollar quote `delimiter`),
        ``-`` (a line comment) or ``/`` (a block comment `depth` deep)."""
        script = self.script
        script.statements += 1
        script.footer = False  # a footer counts only after the last statement
        start_line = self.line
        while self._unread() < 64 and self._more():
            pass
        function = _FUNCTION_START.match(self.buf, self.at) is not None
        head = b""
        first = True
        mode: str | None = None
        delimiter = b""
        paren = begin = depth = 0
        self.after_begin = False
        pos = self.at
        while True:
            if pos - self.at > HEAD_BYTES:
                # Pass a long statement on in pieces, at a point where `mode` says it all.
                if first:
                    head = self.buf[self.at : pos]
                yield self._take(pos, STATEMENT, first, False)
                first = False
            need_more = False
            buf = self.buf
            if mode is None:
                found = _STMT_SPECIAL.search(buf, pos)
                if found is None:
                    end = len(buf)
                    if function:
                        while end > pos and _IDENT_CHAR.match(buf, end - 1):
                            end -= 1  # a word the next chunk may continue
                        begin = self._words(pos, end, paren, begin)
                    pos, need_more = end, True
                else:
                    at = found.start()
                    if function:
                        begin = self._words(pos, at, paren, begin)
                    char = found.group()
                    if char == b";":
                        pos = at + 1
                        if paren == 0 and begin == 0:
                            if first:
                                head = buf[self.at : pos]
                            yield self._take(pos, STATEMENT, first, True)
                            if head[:4].upper() == b"COPY":
                                yield from self._copy_data(head, start_line)
                            else:
                                self._after(head, start_line)
                            return
                    elif char == b"(":
                        paren, pos = paren + 1, at + 1
                    elif char == b")":
                        paren, pos = max(0, paren - 1), at + 1
                    elif char == b"'":
                        mode = "E" if not self.std_strings or self._e_prefix(at) else "'"
                        pos = at + 1
                    elif char == b'"':
                        mode, pos = '"', at + 1
                    elif at + 1 >= len(buf) and not self.eof:
                        need_more, pos = True, at  # "$", "-" or "/": what follows decides
                    elif char == b"$":
                        tag = _DOLLAR_TAG.match(buf, at)
                        if at > self.at and _IDENT_CHAR.match(buf, at - 1):
                            pos = at + 1  # inside an identifier (a$b)
                        elif tag:
                            mode, delimiter, pos = "$", tag.group(), tag.end()
                        elif _TAG_PREFIX.fullmatch(buf, at) and not self.eof:
                            need_more, pos = True, at  # the chunk ends inside a tag
                        else:
                            pos = at + 1  # a parameter ($1) or a lone $
                    elif char == b"-" and buf[at + 1 : at + 2] == b"-":
                        mode, pos = "-", at + 2
                    elif char == b"/" and buf[at + 1 : at + 2] == b"*":
                        mode, depth, pos = "/", 1, at + 2
                    else:
                        pos = at + 1
            elif mode in ("'", "E", '"'):
                found = (_SQ_ESC if mode == "E" else _DQ if mode == '"' else _SQ_STD).search(buf, pos)
                if found is None:
                    pos, need_more = len(buf), True
                else:
                    at = found.start()
                    if at + 1 >= len(buf) and not self.eof:
                        need_more, pos = True, at  # an escape or a doubled quote?
                    elif found.group() == b"\\":
                        pos = at + 2
                    elif buf[at + 1 : at + 2] == found.group():
                        pos = at + 2  # '' or "" stands for one quote
                    else:
                        mode, pos = None, at + 1
            elif mode == "$":
                close = buf.find(delimiter, pos)
                if close < 0:
                    pos, need_more = max(pos, len(buf) - len(delimiter) + 1), True
                else:
                    mode, pos = None, close + len(delimiter)
            elif mode == "-":
                end = buf.find(b"\n", pos)
                if end < 0:
                    pos, need_more = len(buf), True
                else:
                    mode, pos = None, end + 1
            else:  # "/"
                found = _BLOCK.search(buf, pos)
                if found is None:
                    pos, need_more = max(pos, len(buf) - 1), True
                else:
                    depth += 1 if found.group() == b"/*" else -1
                    pos = found.end()
                    if depth == 0:
                        mode = None
            if need_more:
                base = self.at
                if self._more():
                    pos -= base - self.at  # the buffer may have dropped what was handed on
                    continue
                if first:
                    head = self.buf[self.at :]
                if mode is None:
                    # psql sends a last statement without its ";" at the end of a script.
                    script.trailing_statement = start_line
                else:
                    what = {
                        "'": "a quoted string",
                        "E": "a quoted string",
                        '"': "a quoted identifier",
                        "$": "a dollar-quoted body",
                    }.get(mode, "a /* comment */")
                    self._unfinished(what, start_line)
                yield self._take(len(self.buf), STATEMENT, first, True)
                return

    def _words(self, start: int, end: int, paren: int, begin: int) -> int:
        """psql's heuristic for SQL-standard function bodies (psqlscan.l): in CREATE
        FUNCTION/PROCEDURE, BEGIN … END (and CASE … END inside it) hold semicolons."""
        if paren:
            return begin
        for word in _WORD.finditer(self.buf, start, end):
            text = word.group().lower()
            if self.atomic_bodies:
                opens = self.after_begin and text == b"atomic"
                self.after_begin = text == b"begin"
                if opens:
                    begin += 1
                    continue
                if self.after_begin:
                    continue
            if text == b"begin":
                begin += 1
            elif text == b"case" and begin:
                begin += 1
            elif text == b"end" and begin:
                begin -= 1
        return begin

    def _e_prefix(self, at: int) -> bool:
        """Whether the quote at `at` opens an E'…' string (the E a token of its own)."""
        if at <= self.at or self.buf[at - 1 : at] not in (b"e", b"E"):
            return False
        return at - 1 == self.at or not _IDENT_CHAR.match(self.buf, at - 2)

    def _after(self, head: bytes, line: int) -> None:
        """Follow `standard_conforming_strings`, which decides how backslashes in later
        strings read. Only the forms psql's own lexer would agree on are followed; any
        other statement naming it (set_config, SET LOCAL in a function, a DO block) is
        refused rather than guessed at, since a wrong guess reads data as statements."""
        # One C-level match per statement (this runs for every INSERT of a dump).
        control = _TRANSACTION_CONTROL.match(head)
        if control and control.group(1).upper() in (b"BEGIN", b"START"):
            self.transaction_std_strings = self.std_strings
            return
        if control and not control.group(2):
            if (
                control.group(1).upper() in (b"ROLLBACK", b"ABORT")
                and self.transaction_std_strings is not None
            ):
                self.std_strings = self.transaction_std_strings  # a rolled-back SET is undone
            self.transaction_std_strings = None
            return
        if _RESET_ALL.match(head):
            self.std_strings = True
            return
        if _MENTIONS_STD_STRINGS.search(head) is None or _PER_OBJECT_SETTING.match(head):
            return  # (a function's or a database's own setting does not change this session)
        if self.transaction_std_strings is not None:
            raise ScriptError(
                f"line {line}: standard_conforming_strings is changed inside a transaction block, where a "
                "savepoint or rollback may undo it, so how later strings read cannot be told; set it outside "
                "transactions (as pg_dump does) and upload the dump again"
            )
        found = _STD_STRINGS.match(head)
        value = found.group(1).lower() if found else None
        if value in (b"on", b"true", b"1", b"yes", b"default") or _RESET_STD_STRINGS.match(head):
            self.std_strings = True
        elif value in (b"off", b"false", b"0", b"no"):
            self.std_strings = False
        else:
            raise ScriptError(
                f"line {line}: a statement changes standard_conforming_strings (or names it) other than as "
                "`SET standard_conforming_strings = on;` or `= off;`, so how its later strings read cannot "
                "be told; use that form (pg_dump's), or remove the statement, and upload the dump again"
            )

    def _copy_data(self, head: bytes, statement_line: int) -> Iterator[Piece]:
        """The data after `COPY … FROM stdin;`: from the next line to the `\\.` line."""
        if not _COPY_FROM_STDIN.match(head):
            return
        # psql reads the data from the line after the statement's.
        while self.buf.find(b"\n", self.at) < 0 and self._more():
            pass
        end = self.buf.find(b"\n", self.at)
        end = len(self.buf) if end < 0 else end + 1
        if self.buf[self.at : end].strip():
            raise ScriptError(
                f"line {self.line}: text follows a COPY … FROM stdin statement on its line, "
                "where pg_dump ends the line"
            )
        if end > self.at:
            yield self._take(end, SPACE)
        first = True
        while self._unread() < 4 and self._more():
            pass
        marker = _END_AT_START.match(self.buf, self.at)
        if marker:
            yield self._take(marker.end(), COPY)
            return
        pos = self.at
        while True:
            found = _END_OF_COPY.search(self.buf, pos)
            if found is not None:
                yield self._take(found.end(), COPY, first, True)
                return
            # Pass on whole lines; the last, maybe unfinished, one may be the end marker
            # (or, for a line longer than a step, all but its last bytes).
            last = self.buf.rfind(b"\n", self.at)
            if last - self.at < STEP // 2 and self._unread() > STEP:
                last = len(self.buf) - 4
            if last - self.at >= STEP // 2:
                yield self._take(last, COPY, first, False)
                first = False
            pos = max(self.at, len(self.buf) - 4)
            base = self.at
            if not self._more():
                finished = _LAST_LINE_END.search(self.buf, self.at) is not None
                if self._unread():
                    yield self._take(len(self.buf), COPY, first, True)
                if not finished:
                    self._unfinished("the data of a COPY statement", statement_line)
                return
            pos -= base - self.at


_TAG_PREFIX = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?")
_END_AT_START = re.compile(rb"\\\.\r?\n")
# The data ends with the script after "\." without its newline (psql accepts it).
_LAST_LINE_END = re.compile(rb"(?:^|\n)\\\.\r?\Z")
