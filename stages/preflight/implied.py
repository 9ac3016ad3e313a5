"""Schema entries the rehearsal need not run: plain tables, keys and indexes, whose
outcome in a fresh database follows from their schema's and their tables'.

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

A plain table is one CREATE TABLE of columns of built-in types (a fixed list: `integer`,
`text`, `numeric(10,2)`, `timestamp with time zone`, their arrays…), each with at most
a built-in collation (C, POSIX, default) and NOT NULL: no default, no check, no
generated column, no partitioning, inheritance, storage option or second statement. As
the project role, in a schema where it may create a table, it can only succeed; what
could stop it is the schema, so the first plain table of each schema is rehearsed.
Creating a table is the costliest part of a rehearsal (its TOAST table's index is built
and synced to disk: about 2 ms each here, the whole rehearsal of `many`'s 2,000
tables). A plain table is rehearsed anyway when a rehearsed entry depends on it, or
names it anywhere in its SQL (a dependency the archive does not record).
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


# Built-in types as pg_dump prints them (format_type: pg_catalog's types unqualified),
# with their arrays, and the range of each type modifier (a value outside it fails the
# CREATE TABLE). Anything else (a qualified type, one a newer or older server lacks,
# interval with fields) makes the table rehearsed.
_MODIFIED = {
    "numeric": ((1, 1000), (-1000, 1000)),
    "character varying": ((1, 10485760),),
    "character": ((1, 10485760),),
    "bit": ((1, 83886080),),
    "bit varying": ((1, 83886080),),
    "time": ((0, 6),),
    "timestamp": ((0, 6),),
    "interval": ((0, 6),),
}
_TYPE = (
    r"(?P<type>smallint|integer|bigint|real|double precision|numeric|text|boolean|bytea|date"
    r"|character varying|character|time|timestamp|interval|bit varying|bit"
    r"|uuid|jsonb?|inet|cidr|macaddr8?|money|tsvector|tsquery"
    r"|point|line|lseg|box|path|polygon|circle|(?:int4|int8|num|ts|tstz|date)range)"
    r"(?:\((?P<first>\d{1,9})(?:,(?P<second>-?\d{1,9}))?\))?"
    r"(?P<zone> with(?:out)? time zone)?"
    r"(?:\[\])*"
)
_COLUMN = re.compile(
    rf'    (?P<name>{_IDENT}) {_TYPE}(?: COLLATE pg_catalog\."(?:C|POSIX|default)")?(?: NOT NULL)?'
)
_TABLE_HEAD = re.compile(rf"CREATE TABLE (?P<schema>{_IDENT})\.{_IDENT} \(")
MAX_COLUMNS = 1600
# What separates names in SQL text: white space and ASCII punctuation but `_` and `$`.
# Everything else (letters of any script, digits, `·`) may be part of an unquoted name.
_SEPARATORS = re.compile(r"[\s!-#%-/:-@\[-^`{-~]+")
# Past this many plain tables whose names hold separators (spaces, quotes, dots…), they
# are all rehearsed: each is looked for in every rehearsed entry's whole text.
MAX_SEPARATED_NAMES = 100


class Described(Protocol):
    """An archive entry as the rehearsal sees it (stages.preflight.rehearsal.Node)."""

    @property
    def dump_id(self) -> int: ...

    @property
    def desc(self) -> str: ...

    @property
    def depends_on(self) -> Sequence[int]: ...

    @property
    def name(self) -> str: ...


def statement_of(block: str) -> str:
    """An entry's SQL without the comment lines pg_dump writes before it (its header)
    and after the last entry ("-- PostgreSQL database dump complete"), and the blank
    space around it. A comment line between statements is left in: it is then part of
    the text, which no plain entry's pattern takes (and every pattern ends at a `;`
    outside any quote, so what follows it is no part of the statement)."""
    lines = block.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("--")):
        lines.pop(0)
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("--")):
        lines.pop()
    return "\n".join(lines).strip()


def is_plain_key(desc: str, block: str) -> bool:
    """Whether an entry of kind `desc` with SQL `block` is one plain key or index (above)."""
    pattern = _PLAIN.get(desc)
    return pattern is not None and pattern.fullmatch(statement_of(block)) is not None


def is_plain_table(desc: str, block: str) -> bool:
    """Whether an entry of kind `desc` with SQL `block` is one plain table (above)."""
    return plain_table_schema(desc, block) is not None


def plain_table_schema(desc: str, block: str) -> str | None:
    """The schema (as its SQL writes it) of a plain table (above); None for any other entry."""
    if desc != "TABLE":
        return None
    statement = statement_of(block)
    head = _TABLE_HEAD.match(statement)
    if head is None or not statement.endswith("\n);"):
        return None
    body = statement[head.end() : -len("\n);")]
    if body and not _plain_columns(body):
        return None
    return head["schema"]


def _plain_columns(body: str) -> bool:
    """Whether the text between a CREATE TABLE's parentheses is plain columns, one a line."""
    if not body.startswith("\n"):
        return False
    lines = body[1:].split(",\n")
    if len(lines) > MAX_COLUMNS:
        return False
    names: set[str] = set()
    for line in lines:
        column = _COLUMN.fullmatch(line)
        if column is None or not _modifiers_in_range(column):
            return False
        name = column["name"]
        name = name[1:-1].replace('""', '"') if name.startswith('"') else name
        if name in names:
            return False
        names.add(name)
    return True


def _modifiers_in_range(column: re.Match[str]) -> bool:
    kind, first, second = column["type"], column["first"], column["second"]
    if column["zone"] and kind not in ("time", "timestamp"):
        return False
    if kind in ("time", "timestamp") and not column["zone"]:
        return False
    if first is None:
        return second is None
    ranges = _MODIFIED.get(kind)
    if ranges is None or (second is not None and len(ranges) < 2):
        return False
    values = [int(first)] + ([int(second)] if second is not None else [])
    return all(low <= value <= high for value, (low, high) in zip(values, ranges, strict=False))


def _tokens(text: str) -> set[str]:
    """The lower-cased words of `text` between separators, each also without the `$`
    signs around and inside it (`FROM t$$` ends a dollar quote: `t` is meant)."""
    words: set[str] = set()
    for word in _SEPARATORS.split(text.lower()):
        if word:
            words.add(word)
            if "$" in word:
                words.add(word.strip("$"))
                words.update(part for part in word.split("$") if part)
    return words


def implied_entries(entries: Sequence[Described], blocks: Mapping[int, str]) -> set[int]:
    """The ids of `blocks` (entry id -> SQL) the rehearsal need not run: plain tables
    (but the first of each schema), keys and indexes (above) on which no entry it runs
    depends, and tables no entry it runs names.

    Linear in the archive: each entry's text is searched once, when it is to be run.
    A name is found wherever it appears in that text, in a string or a comment too,
    in any case: a table is then rehearsed that need not be, never the other way."""
    by_id = {entry.dump_id: entry for entry in entries}
    implied: set[int] = set()
    sentinels: set[str] = set()  # schemas whose first plain table is rehearsed
    for entry in entries:
        block = blocks.get(entry.dump_id)
        if block is None:
            continue
        if is_plain_key(entry.desc, block):
            implied.add(entry.dump_id)
        elif (schema := plain_table_schema(entry.desc, block)) is not None:
            # The schema as the SQL names it: the listing's words cannot tell "a b" from "a".
            if schema in sentinels:
                implied.add(entry.dump_id)
            else:
                sentinels.add(schema)
    # Implied tables by name: most names are one word; others are looked for whole.
    by_word: dict[str, list[int]] = {}
    separated: dict[int, tuple[str, str]] = {}
    for dump_id in implied:
        entry = by_id[dump_id]
        if entry.desc != "TABLE":
            continue
        name = entry.name.lower()
        if _SEPARATORS.search(name) is None:
            by_word.setdefault(name, []).append(dump_id)
        else:
            separated[dump_id] = (name, name.replace('"', '""'))
    needed: list[int] = []
    if len(separated) > MAX_SEPARATED_NAMES:
        needed.extend(separated)
        separated.clear()

    def run(dump_id: int) -> None:
        """`dump_id` is rehearsed: so is what it depends on and the tables it names."""
        entry = by_id.get(dump_id)
        if entry is not None:
            needed.extend(entry.depends_on)
        text = statement_of(blocks[dump_id])
        for word in _tokens(text):
            needed.extend(by_word.pop(word, ()))
        if separated:
            lowered = text.lower()
            for table, forms in list(separated.items()):
                if any(form in lowered for form in forms):
                    needed.append(table)
                    del separated[table]

    for dump_id in blocks:
        if dump_id not in implied:
            run(dump_id)
    while needed:
        dep = needed.pop()
        if dep in implied:
            implied.discard(dep)
            run(dep)
    return implied
