"""Verification of a copy: exact row counts per table, index and constraint counts.

A method's time counts only if `compare(source_shape, target_shape)` finds nothing:
fast and wrong is a failure. Counts are taken with `count(*)` on every user table (not
statistics, which are estimates), as the superuser, whoever owns the objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from bench.pg import Cluster

# Schemas that are not the user's data: the catalogs, and what pgcopydb leaves behind.
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pgcopydb")
_USER_NAMESPACE = "n.nspname NOT IN %(system)s AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%'"
# Objects that belong to an extension (created by CREATE EXTENSION) are not counted.
_NOT_EXTENSION = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = {oid} AND d.deptype = 'e')"

CONSTRAINT_KINDS = {"p": "primary key", "f": "foreign key", "u": "unique", "c": "check", "x": "exclusion"}


@dataclass(frozen=True)
class Shape:
    """What a verified copy must reproduce exactly."""

    rows: dict[str, int]  # "schema.table" -> count(*)
    indexes: dict[str, int]  # "schema.table" -> number of indexes on it
    constraints: dict[str, int] = field(default_factory=dict)  # kind ("primary key", …) -> count

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def shape(cluster: Cluster, dbname: str) -> Shape:
    """Read `dbname`'s shape: one count(*) per table, indexes per table, constraints by kind."""
    conn = psycopg2.connect(cluster.url(dbname))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE c.relkind = 'r' AND {_USER_NAMESPACE} AND {_NOT_EXTENSION.format(oid='c.oid')} "
                f"ORDER BY 1, 2",
                {"system": _SYSTEM_SCHEMAS},
            )
            tables = cur.fetchall()
            rows: dict[str, int] = {}
            for schema, table in tables:
                cur.execute(
                    sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(table)
                    )
                )
                rows[f"{schema}.{table}"] = int(cur.fetchone()[0])
            cur.execute(
                f"SELECT n.nspname || '.' || t.relname, count(*) FROM pg_index i "
                f"JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
                f"WHERE {_USER_NAMESPACE} AND {_NOT_EXTENSION.format(oid='t.oid')} GROUP BY 1",
                {"system": _SYSTEM_SCHEMAS},
            )
            indexes = {name: int(count) for name, count in cur.fetchall()}
            cur.execute(
                f"SELECT k.contype, count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace "
                f"WHERE {_USER_NAMESPACE} AND k.contype IN ('p', 'f', 'u', 'c', 'x') GROUP BY 1",
                {"system": _SYSTEM_SCHEMAS},
            )
            constraints = {CONSTRAINT_KINDS[kind]: int(count) for kind, count in cur.fetchall()}
    finally:
        conn.close()
    return Shape(rows=rows, indexes=indexes, constraints=constraints)


def compare(source: Shape, target: Shape, *, limit: int = 10) -> list[str]:
    """Every way `target` differs from `source` (at most `limit` lines per kind); [] if none."""
    problems: list[str] = []

    def add(kind: list[str]) -> None:
        problems.extend(kind[:limit])
        if len(kind) > limit:
            problems.append(f"... and {len(kind) - limit} more")

    add([f"table {t} is missing" for t in sorted(source.rows.keys() - target.rows.keys())])
    add([f"table {t} is not in the source" for t in sorted(target.rows.keys() - source.rows.keys())])
    add(
        [
            f"table {t} has {target.rows[t]} rows, the source {source.rows[t]}"
            for t in sorted(source.rows.keys() & target.rows.keys())
            if source.rows[t] != target.rows[t]
        ]
    )
    add(
        [
            f"table {t} has {target.indexes.get(t, 0)} indexes, the source {source.indexes.get(t, 0)}"
            for t in sorted(source.indexes.keys() | target.indexes.keys())
            if source.indexes.get(t, 0) != target.indexes.get(t, 0) and t in target.rows and t in source.rows
        ]
    )
    add(
        [
            f"{target.constraints.get(k, 0)} {k} constraints, the source {source.constraints.get(k, 0)}"
            for k in sorted(source.constraints.keys() | target.constraints.keys())
            if source.constraints.get(k, 0) != target.constraints.get(k, 0)
        ]
    )
    return problems
