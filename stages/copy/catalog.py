"""What a live source's snapshot holds for the copy: the tables whose rows stream, and
which table each index and constraint of the schema dump belongs to.

Read on the snapshot's own session, with search_path pinned to pg_catalog (a tenant's
operators in `public` are never called; pg_get_indexdef qualifies every table name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from stages.copy.stream import SourceTable
from stages.database.inventory import table_key
from stages.dumps.toc import CatalogId

# Ordinary tables and partitions that hold rows, outside system schemas and not members
# of an extension (as stages.database.inventory lists them for the counts): their stored
# columns, whether every one of them is of a type binary COPY may move (_BINARY_TYPE), and
# whether one is an interval (or an array of them: SourceTable.keeps_binary); reltuples is
# the planner's estimate of its rows (-1 or 0 when never analyzed; any float4 a superuser
# of the source writes there, NaN and Infinity included).
_TABLES = """
SELECT c.oid, n.nspname, c.relname, pg_catalog.pg_table_size(c.oid), c.reltuples,
       ARRAY(SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
               AND NOT a.attisdropped {generated}
             ORDER BY a.attnum),
       NOT EXISTS (
           SELECT 1 FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
           LEFT JOIN pg_catalog.pg_type e ON e.oid OPERATOR(pg_catalog.=) t.typelem
                AND t.typcategory OPERATOR(pg_catalog.=) 'A'
           WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
             AND NOT a.attisdropped {generated}
             AND NOT ({binary_type} AND (e.oid IS NULL OR {binary_element}))),
       EXISTS (
           SELECT 1 FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
           WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
             AND NOT a.attisdropped {generated}
             AND 'pg_catalog.interval'::pg_catalog.regtype OPERATOR(pg_catalog.=) ANY (ARRAY[t.oid, t.typelem]))
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
ORDER BY 2, 3
"""

# A type whose values COPY may move in its binary format between two servers of one
# major version and one encoding (see SourceTable.binary): a base type (or an array of
# one) of PostgreSQL's own, with a fixed oid (below FirstGenbkiObjectId: an array's
# elements carry their type's oid), and with binary send and receive functions (aclitem
# has none). Not the reg* types: their binary form is the object's oid in the source's
# catalog, their text form its name, which is what the preview must resolve again
# (`'public.t'::regclass`). Not int2vector and oidvector: their binary receive refuses an
# empty value (a function without arguments' `proargtypes`) that their text input
# takes. Anything else (an extension's type, an enum, a domain, a range, a composite) is
# copied as text.
_NOT_BINARY = (
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regclass",
    "regcollation",
    "regtype",
    "regrole",
    "regnamespace",
    "regconfig",
    "regdictionary",
    "int2vector",
    "oidvector",
)
_BINARY_TYPE = (
    "({t}.oid OPERATOR(pg_catalog.<) 10000 AND {t}.typtype OPERATOR(pg_catalog.=) 'b'"
    " AND {t}.typsend OPERATOR(pg_catalog.<>) 0 AND {t}.typreceive OPERATOR(pg_catalog.<>) 0"
    " AND {t}.typname OPERATOR(pg_catalog.<>) ALL (ARRAY["
    + ", ".join(f"'{name}'" for name in _NOT_BINARY)
    + "]::pg_catalog.name[]))"
)

# Indexes that back no constraint (those come with their CONSTRAINT entry).
_INDEXES = """
SELECT ic.tableoid, ic.oid, t.oid, am.amname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) i.indexrelid
JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) i.indrelid
JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ic.relam
WHERE t.relkind OPERATOR(pg_catalog.=) 'r'
"""

_CONSTRAINTS = """
SELECT k.tableoid, k.oid, k.conrelid, k.contype, k.confrelid,
       CASE WHEN k.contype OPERATOR(pg_catalog.=) ANY (ARRAY['p', 'u']::"char"[])
                 AND k.conindid OPERATOR(pg_catalog.<>) 0
                 AND k.conrelid OPERATOR(pg_catalog.=) ANY (%(keyed)s::pg_catalog.oid[])
            THEN pg_catalog.pg_get_indexdef(k.conindid) END,
       k.condeferrable, k.condeferred, am.amname, k.conname, ki.relname
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) k.conrelid
LEFT JOIN pg_catalog.pg_class ki ON ki.oid OPERATOR(pg_catalog.=) k.conindid
LEFT JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ki.relam
WHERE t.relkind OPERATOR(pg_catalog.=) 'r' AND k.contype OPERATOR(pg_catalog.=) ANY (ARRAY['p', 'u', 'x', 'f']::"char"[])
"""


@dataclass(frozen=True)
class Owned:
    """What a post-data entry of the schema dump does to which table (`table`, its
    oid: names "schema.table" can be the same text for two tables): `kind` is "index",
    "constraint" or "foreign key"; `references` the table a foreign key points to; `method` the index's access method (its build cost); `unique_index` the
    definition of a primary key's (`primary`) or unique constraint's index, built first
    as a plain unique index (alongside the table's other indexes) and then attached:
    the constraint `name`d, by its index `index_name` (names from the catalog, never
    read back out of SQL text)."""

    table: int
    kind: str
    method: str = "btree"
    references: int | None = None
    unique_index: str | None = None
    deferrable: bool = False
    deferred: bool = False
    primary: bool = False
    name: str | None = None
    index_name: str | None = None


@dataclass(frozen=True)
class SourceCatalog:
    """`owned` is keyed by the catalog id of the index or constraint, as the schema
    archive's TOC entries carry it (stages.dumps.toc.TocEntry.catalog_id): names cannot be
    told apart reliably in pg_restore's listing (a schema's name may hold a space)."""

    tables: list[SourceTable]
    owned: dict[CatalogId, Owned]


def read_tables(conn: psycopg2.extensions.connection) -> list[SourceTable]:
    """The tables to copy (with their stored columns and sizes), as `conn`'s transaction
    sees them (search_path must be pinned to pg_catalog)."""
    with conn.cursor() as cur:
        generated = "AND a.attgenerated OPERATOR(pg_catalog.=) ''" if conn.server_version >= 120000 else ""
        cur.execute(
            _TABLES.format(
                generated=generated,
                binary_type=_BINARY_TYPE.format(t="t"),
                binary_element=_BINARY_TYPE.format(t="e"),
            )
        )
        return [
            SourceTable(
                table_key(schema, name),
                schema,
                name,
                tuple(columns),
                int(size or 0),
                int(oid),
                binary=bool(binary) and bool(columns),
                rows=_estimate(tuples),
                keeps_binary=bool(interval),
            )
            for oid, schema, name, size, tuples, columns, binary, interval in cur.fetchall()
        ]


def _estimate(reltuples: float | None) -> int:
    """pg_class.reltuples as a count of rows; 0 (no estimate) for -1, NaN or Infinity."""
    if reltuples is None or not math.isfinite(reltuples) or reltuples <= 0:
        return 0
    return int(reltuples)


def read_catalog(conn: psycopg2.extensions.connection, *, key_definitions_from: int = 0) -> SourceCatalog:
    """The tables to copy and the owners of indexes and constraints, as the snapshot
    `conn` is in sees them (search_path must be pinned to pg_catalog).

    Only the tables returned (`tables`) of `key_definitions_from` bytes or more
    (`SourceTable.bytes`) have their primary keys' and unique constraints' index
    definitions read (`Owned.unique_index`; never a foreign key's or an exclusion
    constraint's, which the engine does not use): the copy builds a smaller table's keys
    with the dump's own ALTER TABLE, and `pg_get_indexdef` for every key was two thirds
    of this read on a source of 2,000 small tables."""
    tables = read_tables(conn)
    keyed = [t.oid for t in tables if t.bytes >= key_definitions_from]
    with conn.cursor() as cur:
        owned: dict[CatalogId, Owned] = {}
        cur.execute(_INDEXES)
        for catalog, oid, table, method in cur.fetchall():
            owned[(int(catalog), int(oid))] = Owned(int(table), "index", method)
        cur.execute(_CONSTRAINTS, {"keyed": keyed})
        for (
            catalog,
            oid,
            table,
            contype,
            references,
            indexdef,
            deferrable,
            deferred,
            method,
            name,
            index_name,
        ) in cur.fetchall():
            if contype == "f":
                owned[(int(catalog), int(oid))] = Owned(int(table), "foreign key", references=int(references))
                continue
            unique = indexdef if contype in ("p", "u") and method == "btree" and indexdef else None
            owned[(int(catalog), int(oid))] = Owned(
                int(table),
                "constraint",
                method or "btree",
                unique_index=unique,
                deferrable=deferrable,
                deferred=deferred,
                primary=contype == "p",
                name=name if unique else None,
                index_name=index_name if unique else None,
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
                    sql.SQL(", ").join(
                        sql.SQL("ONLY {}").format(sql.Identifier(t.schema, t.name)) for t in chunk
                    )
                )
            )
