"""The schema rehearsal of a plain SQL dump (see stages.preflight.rehearsal).

A plain script has no table of contents, but pg_dump writes a header before each
object, the same description and names the archive's TOC holds:

    --
    -- Name: profiles profiles are readable; Type: POLICY; Schema: public; Owner: app
    --

The script, as the import prepares it (stages.dumps.plainsql), is cut at those headers; the
data sections ("-- Data for Name: …", sequence values, large objects, materialized view
refreshes) are left out, and every other object runs in a transaction of its own.
Without dependency data, an error that names an object that failed for a managed
target (`type "public.capy_cube" does not exist`) counts as depending on it.

Objects a managed target cannot hold, that no table needs, are skipped as for an
archive: the import leaves the statements under their headers out of the script
(stages.dumps.plainsql). Only the head preflight reads is rehearsed: an object past it that
the project cannot hold fails the restore (into the preview, before the live database
changes), with the line of the user's dump.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
from collections.abc import Mapping
from typing import BinaryIO

from stages.dumps.plainsql import prepare_plain_sql
from stages.dumps.rows import RowCounter
from stages.dumps.sqlscript import CHUNK, COPY, STATEMENT, read_script, statement_words
from stages.dumps.toc import TocEntry
from stages.errors import CapyError
from stages.preflight.rehearsal import Node, Rehearsal, rehearse_blocks, split_at_headers
from stages.preflight.sandbox import Sandbox
from stages.tools.timelimit import Deadline

# A header is a comment line between two "--" lines. The lookahead checks that first,
# once per line: then the first "; Type: " whose fields read through to the end of the
# line is the match, and no line costs more than a pass over it (without it, a long line
# of "; Type: ; Schema: ; Owner: ; Tablespace: " repeated was searched once per repeat).
_HEADER = re.compile(
    r"^--\n(?=[^\n]*+\n--\n)-- (Data for )?Name: ([^\n]*?); Type: ([^\n;]*+); Schema: ([^\n;]*+); "
    r"Owner: [^\n;]*+(?:; Tablespace: [^\n]*+)?\n--\n",
    re.M,
)
_PG_DUMP_RESTRICT = re.compile(r"^\\(?:un)?restrict [A-Za-z0-9]+$", re.M)
# What loads or derives data: not part of a schema rehearsal. (A large object's own
# entry, "BLOB", creates it empty: comments and grants on it need it.)
_DATA_TYPES = frozenset({"TABLE DATA", "SEQUENCE SET", "BLOBS", "BLOB DATA", "MATERIALIZED VIEW DATA"})


def split_plain(script: str, *, complete: bool) -> tuple[str, list[tuple[TocEntry, str]]]:
    """(preamble, [(entry, SQL)]) of a plain script's schema objects, in order. The last
    object of an incomplete script (a head) may be cut short: it is left out."""
    script = _PG_DUMP_RESTRICT.sub("", script).removeprefix("\ufeff")  # psql skips a BOM too
    preamble, parts = split_at_headers(script, _HEADER)
    objects: list[tuple[TocEntry, str]] = []
    for found, body in parts:
        data, name, desc, schema = found.groups()
        if data or desc in _DATA_TYPES:
            continue
        dump_id = len(objects) + 1
        objects.append((TocEntry("", dump_id, desc, schema, name), body))
    if not complete and objects:
        objects.pop()
    return preamble, objects


def keep_schema(src: str | BinaryIO, dst: str, *, gzipped: bool) -> None:
    """Copy the plain script `src` (a path, or a binary stream read once, such as the
    upload in object storage) to `dst` without its data (COPY blocks and INSERT
    statements), so that the schema of a dump of any size can be rehearsed: what is
    left is pg_dump's headers and the schema statements, a small file (bounded memory;
    a script psql could not read raises stages.dumps.sqlscript.ScriptError)."""
    dropping = False
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(src, "rb")) if isinstance(src, str) else src
        reader = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")) if gzipped else raw
        out = stack.enter_context(open(dst, "wb"))
        for piece in read_script(iter(lambda: reader.read(CHUNK), b"")):
            if piece.kind == COPY:
                continue
            if piece.kind == STATEMENT:
                if piece.first:
                    words = statement_words(piece.data, 1)
                    dropping = words[:1] in (["COPY"], ["INSERT"])
                if dropping:
                    continue
            out.write(piece.data)


def rehearse_plain(
    head_path: str,
    sandbox: Sandbox,
    work_dir: str,
    deadline: Deadline,
    *,
    gzipped: bool,
    complete: bool,
    max_bytes: int,
    allowed_extensions: set[str],
) -> Rehearsal:
    """Rehearse the schema objects of a plain script (or of its head)."""
    prepared = os.path.join(work_dir, "rehearsal.sql")
    try:
        plain = prepare_plain_sql(
            head_path, prepared, gzipped=gzipped, max_bytes=max_bytes, counter=RowCounter()
        )
    except CapyError as err:
        return Rehearsal(unavailable=f"the SQL of the upload's head could not be read ({err.message})")
    with open(prepared, encoding="utf-8", errors="replace") as fh:
        script = fh.read()
    if not _HEADER.search(script):
        # Not pg_dump's output (a hand-written script, COPY data anywhere): psql alone
        # knows how to run it, statement by statement.
        return Rehearsal(unavailable="the script has none of pg_dump's object headers (-- Name: …; Type: …)")
    preamble, objects = split_plain(script, complete=complete)
    if plain.meta_commands:
        # `\connect` (pg_dump --create) and the like, outside data: the restore refuses
        # them, and says which pg_dump options to use instead.
        return Rehearsal(
            unavailable="the script holds psql commands (such as \\connect), which the import refuses"
        )
    extensions = {name: schema for name, schema in plain.extensions.items() if name in allowed_extensions}
    blocks = {entry.dump_id: body for entry, body in objects}
    # The skipped ones (and what depends on them) are left out of the script by their
    # pg_dump headers when the import prepares it (stages.dumps.plainsql, `skip`).
    return rehearse_blocks(
        sandbox, extensions, preamble, blocks, deadline, lambda errors: _nodes(objects, errors)
    )


def _nodes(objects: list[tuple[TocEntry, str]], errors: Mapping[int, str]) -> list[Node]:
    """Nodes whose dependencies are the earlier failed objects an error names."""
    nodes: list[Node] = []
    failed: list[tuple[int, re.Pattern[str]]] = []
    for entry, _body in objects:
        message = errors.get(entry.dump_id)
        depends = tuple(dump_id for dump_id, named in failed if message and named.search(message))
        nodes.append(Node(entry, depends))
        if message is not None and (bare := _bare(entry.name)):
            failed.append((entry.dump_id, re.compile(rf"\b{re.escape(bare)}\b")))
    return nodes


def _bare(name: str) -> str:
    """ "capy_cube_in" of "capy_cube_in(cstring)"; the last word of "notes notes_read";
    "mytype" of a cast's "(public.mytype AS integer)" (its source type)."""
    if name.startswith(("CAST (", "(")):
        name = name.split("(", 1)[1].split(" AS ", 1)[0]
    return name.split("(", 1)[0].rsplit(" ", 1)[-1].rsplit(".", 1)[-1].strip('"')
