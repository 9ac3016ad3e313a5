"""Schema entries the rehearsal need not run: plain keys and indexes, whose outcome in
a fresh database follows from their tables'.

A primary key, a unique constraint, a foreign key or a btree index over plain columns
asks nothing of the project role that creating its tables did not: the role owns those
tables, the rows to check are none (the rehearsal loads no data), and the operator
classes are the built-in ones of the columns' types. If a table does not restore, its
keys and indexes are refused with it through the archive's dependencies, run or not.
Running them cost as much as the tables themselves: 6,000 of them on the `many`
benchmark source (2,000 tables), and each foreign key into one parent table rebuilds
that table's triggers, so the rehearsal took longer than the restore of the whole
schema. The restore still creates them, and says which one failed if any does.

An entry counts only when its SQL is exactly one such statement, as pg_dump writes
it: an expression, a predicate, a collation, an operator class, another access
method, INCLUDE, NULLS NOT DISTINCT or anything else after it makes it rehearsed.
And it is rehearsed anyway when another rehearsed entry depends on it (a view that
groups by a primary key, a foreign key of another form that references it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

# PostgreSQL 15's keywords that are not "unreserved" (`SELECT word FROM pg_get_keywords()
# WHERE catcode <> 'U'`): pg_dump quotes them as names, so unquoted they are SQL
# (`btree (user)` is CURRENT_USER, `INDEX concurrently ON` is CREATE INDEX CONCURRENTLY).
_KEYWORDS = (
    "all analyse analyze and any array as asc asymmetric authorization between "
    "bigint binary bit boolean both case cast char character check coalesce collate "
    "collation column concurrently constraint create cross current_catalog "
    "current_date current_role current_schema current_time current_timestamp "
    "current_user dec decimal default deferrable desc distinct do else end except "
    "exists extract false fetch float for foreign freeze from full grant greatest "
    "group grouping having ilike in initially inner inout int integer intersect "
    "interval into is isnull join lateral leading least left like limit localtime "
    "localtimestamp national natural nchar none normalize not notnull null nullif "
    "numeric offset on only or order out outer overlaps overlay placing position "
    "precision primary real references returning right row select session_user setof "
    "similar smallint some substring symmetric table tablesample then time timestamp "
    "to trailing treat trim true union unique user using values varchar variadic "
    "verbose when where window with xmlattributes xmlconcat xmlelement xmlexists "
    "xmlforest xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable "
).split()
_NOT_KEYWORD = r"(?!(?:" + "|".join(_KEYWORDS) + r")(?![a-z0-9_$]))"
# A name as pg_dump prints it: lower-case and not a keyword, or quoted (on one line).
_IDENT = rf'(?:{_NOT_KEYWORD}[a-z_][a-z0-9_$]*|"(?:[^"\n]|"")+")'
_QUALIFIED = rf"{_IDENT}\.{_IDENT}"
_COLUMNS = rf"{_IDENT}(?:, {_IDENT})*"
_ALTER = rf"ALTER TABLE ONLY {_QUALIFIED}\s+ADD CONSTRAINT {_IDENT} "
_ACTION = r"(?:CASCADE|RESTRICT|SET NULL|SET DEFAULT|NO ACTION)"
_PLAIN = {
    "INDEX": re.compile(
        rf"CREATE (?:UNIQUE )?INDEX {_IDENT} ON (?:ONLY )?{_QUALIFIED} USING btree \({_COLUMNS}\);"
    ),
    "CONSTRAINT": re.compile(rf"{_ALTER}(?:PRIMARY KEY|UNIQUE) \({_COLUMNS}\);"),
    "FK CONSTRAINT": re.compile(
        rf"{_ALTER}FOREIGN KEY \({_COLUMNS}\) REFERENCES {_QUALIFIED}\({_COLUMNS}\)"
        rf"(?: ON UPDATE {_ACTION})?(?: ON DELETE {_ACTION})?(?: DEFERRABLE(?: INITIALLY DEFERRED)?)?"
        r"(?: NOT VALID)?;"
    ),
}


class Described(Protocol):
    """An archive entry as the rehearsal sees it (stages.preflight.rehearsal.Node)."""

    @property
    def dump_id(self) -> int: ...

    @property
    def desc(self) -> str: ...

    @property
    def depends_on(self) -> Sequence[int]: ...


def statement_of(block: str) -> str:
    """An entry's SQL without the comment lines pg_dump writes before it (its header)
    and the blank space around it. A comment line further down is left in: it is then
    part of the text, which no plain key's pattern takes."""
    lines = block.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("--")):
        lines.pop(0)
    return "\n".join(lines).strip()


def is_plain_key(desc: str, block: str) -> bool:
    """Whether an entry of kind `desc` with SQL `block` is one plain key or index (above)."""
    pattern = _PLAIN.get(desc)
    return pattern is not None and pattern.fullmatch(statement_of(block)) is not None


def implied_entries(entries: Sequence[Described], blocks: Mapping[int, str]) -> set[int]:
    """The ids of `blocks` (entry id -> SQL) the rehearsal need not run: plain keys and
    indexes (above) on which no entry it runs depends."""
    implied = {
        entry.dump_id
        for entry in entries
        if entry.dump_id in blocks and is_plain_key(entry.desc, blocks[entry.dump_id])
    }
    # What a rehearsed entry needs is rehearsed too, and what that needs, and so on.
    needed = [dep for entry in entries if entry.dump_id not in implied for dep in entry.depends_on]
    by_id = {entry.dump_id: entry for entry in entries}
    while needed:
        dep = needed.pop()
        if dep in implied:
            implied.discard(dep)
            needed.extend(by_id[dep].depends_on)
    return implied
