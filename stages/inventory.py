"""What a database holds: its tables and their exact row counts.

The same queries run on the source (inside the dump's snapshot) and on the restored
preview, so the two sides are compared like for like.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg2.extensions
from psycopg2 import sql

# Ordinary tables and partitions that hold rows, outside system schemas and not
# members of an extension (an extension's own tables are recreated by the extension).
_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
  )
ORDER BY 1, 2
"""


def table_key(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def list_tables(conn: psycopg2.extensions.connection) -> list[tuple[str, str]]:
    with conn.cursor() as cur:
        cur.execute(_TABLES)
        return [(schema, name) for schema, name in cur.fetchall()]


def count_rows(
    conn: psycopg2.extensions.connection,
    tables: list[tuple[str, str]] | None = None,
    on_table: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Exact `count(*)` of every table, keyed "schema.table"."""
    if tables is None:
        tables = list_tables(conn)
    counts: dict[str, int] = {}
    with conn.cursor() as cur:
        for done, (schema, name) in enumerate(tables, start=1):
            cur.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.Identifier(schema, name)))
            counts[table_key(schema, name)] = int(cur.fetchone()[0])
            if on_table:
                on_table(done, len(tables))
    return counts


def is_empty(conn: psycopg2.extensions.connection) -> bool:
    """True when the database holds no user objects beyond the default public schema."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT
              (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%')
            + (SELECT count(*) FROM pg_namespace
                 WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')
                   AND nspname NOT LIKE 'pg\\_toast%%' AND nspname NOT LIKE 'pg\\_temp\\_%%')
            + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
            + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND t.typtype IN ('d', 'e', 'r', 'm')
               )
            """
        )
        return int(cur.fetchone()[0]) == 0


def compare_counts(source: dict[str, int], target: dict[str, int]) -> list[str]:
    """Problems found comparing row counts: missing tables and count mismatches."""
    problems = []
    for table, expected in sorted(source.items()):
        if table not in target:
            problems.append(f"table {table} is missing")
        elif target[table] != expected:
            problems.append(f"table {table} has {target[table]} rows, the source has {expected}")
    return problems
