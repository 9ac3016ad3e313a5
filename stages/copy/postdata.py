"""The post-data section of a schema archive (indexes, constraints, triggers, policies,
materialized views' data…), one SQL block per TOC entry, as pg_restore would run it.

pg_restore prints each entry under a header ("-- Name: …; Type: …; Schema: …; Owner: …")
in the order of the list it is given; the blocks are matched to the list's entries by
that order and by their type and name. Whatever does not match exactly is not split:
the caller then restores the whole section with pg_restore (`Rendered.exact` is False).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stages.dumps.toc import TocEntry

# pg_restore (15.14 and later) frames its output in \restrict … \unrestrict, psql's commands.
_META = re.compile(r"^\\(?:restrict|unrestrict)\b.*$", re.M)
_HEADER = re.compile(r"^--\n-- Name: (.*); Type: (.*); Schema: (.*); Owner: (.*)\n--\n", re.M)


@dataclass(frozen=True)
class Block:
    entry: TocEntry
    sql: str


@dataclass(frozen=True)
class Rendered:
    """`preamble`: the session settings pg_restore runs first (search_path, encoding,
    standard_conforming_strings…); `blocks`: one per post-data entry of the list."""

    preamble: str
    blocks: list[Block]
    exact: bool


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def split(script: str, entries: list[TocEntry]) -> Rendered:
    """Cut pg_restore's output for `entries` (a --section=post-data rendering) into one
    block per entry it printed. `entries` is the list given to pg_restore, in order;
    entries of other sections print nothing and are passed over."""
    script = _META.sub("", script)
    headers = list(_HEADER.finditer(script))
    preamble = script[: headers[0].start()] if headers else script
    blocks: list[Block] = []
    remaining = iter(entries)
    for i, header in enumerate(headers):
        name, desc, schema = header.group(1), header.group(2), header.group(3)
        end = headers[i + 1].start() if i + 1 < len(headers) else len(script)
        for entry in remaining:
            # Schema and name together: the listing's split between them is a guess
            # when the schema's name holds a space (stages.dumps.toc.parse).
            if entry.desc == desc and _same(f"{entry.namespace} {entry.name}", f"{schema} {name}"):
                blocks.append(Block(entry, script[header.end() : end]))
                break
        else:
            return Rendered(preamble, [], False)
    return Rendered(preamble, blocks, True)


def first_statement(block: str) -> tuple[str, str]:
    """A CONSTRAINT block split after its ALTER TABLE … ADD CONSTRAINT statement (pg_dump
    ends it with ";" and a newline; nothing inside it holds that pair), and the rest
    (e.g. `ALTER TABLE … CLUSTER ON`)."""
    head, sep, rest = block.partition(";\n")
    return head + sep, rest
