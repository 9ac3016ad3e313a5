"""What a live source's snapshot holds for the copy: the tables whose rows stream, and
which table each index and constraint of the schema dump belongs to.

Read on the snapshot's own session, with search_path pinned to pg_catalog (a tenant's
operators in `public` are never called; pg_get_indexdef qualifies every table name).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from stages.copy.stream import SourceTable
from stages.inventory import table_key

# Ordinary tables and partitions that hold rows, outside system schemas and not members
# of an extension (as stages.inventory lists them for the counts).
_TABLES = """
SELECT n.nspname, c.relname, pg_catalog.pg_table_size(c.oid),
       ARRAY(SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
               AND NOT a.attisdropped {generated}
             ORDER BY a.attnum)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
  AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema'])
  AND NOT (n.nspname OPERATOR(pg_catalog.~~) 'pg\\_toast%%')
  AND NOT (n.nspname OPERATOR(pg_catalog.~~) 'pg\\_temp\\_%%')
  AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_depend d
      WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
        AND d.objid OPERATOR(pg_catalog.=) c.oid AND d.deptype OPERATOR(pg_catalog.=) 'e')
ORDER BY 1, 2
"""

# Indexes that back no constraint (those come with their CONSTRAINT entry).
_INDEXES = """
SELECT n.nspname, ic.relname, tn.nspname, t.relname, am.amname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) i.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) ic.relnamespace
JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) i.indrelid
JOIN pg_catalog.pg_namespace tn ON tn.oid OPERATOR(pg_catalog.=) t.relnamespace
JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ic.relam
WHERE t.relkind OPERATOR(pg_catalog.=) 'r'
"""

_CONSTRAINTS = """
SELECT tn.nspname, t.relname, k.conname, k.contype, fn.nspname, f.relname,
       CASE WHEN k.conindid OPERATOR(pg_catalog.<>) 0 THEN pg_catalog.pg_get_indexdef(k.conindid) END,
       k.condeferrable, k.condeferred, am.amname
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) k.conrelid
JOIN pg_catalog.pg_namespace tn ON tn.oid OPERATOR(pg_catalog.=) t.relnamespace
LEFT JOIN pg_catalog.pg_class f ON f.oid OPERATOR(pg_catalog.=) k.confrelid
LEFT JOIN pg_catalog.pg_namespace fn ON fn.oid OPERATOR(pg_catalog.=) f.relnamespace
LEFT JOIN pg_catalog.pg_class ki ON ki.oid OPERATOR(pg_catalog.=) k.conindid
LEFT JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ki.relam
WHERE t.relkind OPERATOR(pg_catalog.=) 'r' AND k.contype OPERATOR(pg_catalog.=) ANY (ARRAY['p', 'u', 'x', 'f']::"char"[])
"""


@dataclass(frozen=True)
class Owned:
    """What a post-data entry of the schema dump does to which table: `kind` is
    "index", "constraint" or "foreign key"; `references` the table a foreign key points
    to; `method` the index's access method (its build cost); `unique_index` the
    definition of a primary key's or unique constraint's index, built first as a plain
    unique index (alongside the table's other indexes) and then attached."""

    table: str
    kind: str
    method: str = "btree"
    references: str | None = None
    unique_index: str | None = None
    deferrable: bool = False
    deferred: bool = False


# TOC entries are keyed as pg_restore --list names them: (desc, namespace, tag).
EntryKey = tuple[str, str, str]


@dataclass(frozen=True)
class SourceCatalog:
    tables: list[SourceTable]
    owned: dict[EntryKey, Owned]


def read_catalog(conn: psycopg2.extensions.connection) -> SourceCatalog:
    """The tables to copy and the owners of indexes and constraints, as the snapshot
    `conn` is in sees them (search_path must be pinned to pg_catalog)."""
    with conn.cursor() as cur:
        generated = (
            "AND a.attgenerated OPERATOR(pg_catalog.=) ''" if conn.server_version >= 120000 else ""
        )
        cur.execute(_TABLES.format(generated=generated))
        tables = [
            SourceTable(table_key(schema, name), schema, name, tuple(columns), int(size or 0))
            for schema, name, size, columns in cur.fetchall()
        ]
        owned: dict[EntryKey, Owned] = {}
        cur.execute(_INDEXES)
        for schema, index, table_schema, table, method in cur.fetchall():
            owned[("INDEX", schema, index)] = Owned(table_key(table_schema, table), "index", method)
        cur.execute(_CONSTRAINTS)
        for schema, table, name, contype, ref_schema, ref_table, indexdef, deferrable, deferred, method in cur.fetchall():
            key = table_key(schema, table)
            if contype == "f":
                owned[("FK CONSTRAINT", schema, f"{table} {name}")] = Owned(
                    key, "foreign key", references=table_key(ref_schema, ref_table)
                )
                continue
            unique = indexdef if contype in ("p", "u") and method == "btree" and indexdef else None
            owned[("CONSTRAINT", schema, f"{table} {name}")] = Owned(
                key, "constraint", method or "btree", unique_index=unique, deferrable=deferrable, deferred=deferred
            )
    return SourceCatalog(tables, owned)


def lock_tables(conn: psycopg2.extensions.connection, tables: list[SourceTable]) -> None:
    """ACCESS SHARE on every table to copy, held by the snapshot's transaction until the
    copy ends: a DROP or ALTER on the source waits instead of breaking the copy."""
    with conn.cursor() as cur:
        for start in range(0, len(tables), 500):
            chunk = tables[start : start + 500]
            cur.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                    sql.SQL(", ").join(sql.SQL("ONLY {}").format(sql.Identifier(t.schema, t.name)) for t in chunk)
                )
            )
