"""What a database holds: its tables and their exact row counts.

The same queries run on the source (inside the dump's snapshot) and on the restored
preview, so the two sides are compared like for like.

A tenant may define operators and functions in `public` of the database these queries
read, so every session that runs them pins its search_path to `pg_catalog, pg_temp`
(see stages.database.cluster); the operators and functions are schema-qualified as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from stages.connections.rows import one_row

# Ordinary tables and partitions that hold rows, outside system schemas and not
# members of an extension (an extension's own tables are recreated by the extension).
_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT (n.nspname OPERATOR(pg_catalog.~~) 'pg\\_toast%%')
  AND NOT (n.nspname OPERATOR(pg_catalog.~~) 'pg\\_temp\\_%%')
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid AND d.deptype = 'e'
  )
ORDER BY 1, 2
"""


def table_key(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def list_tables(conn: psycopg2.extensions.connection) -> list[tuple[str, str]]:
    with conn.cursor() as cur:
        cur.execute(_TABLES)
        return [(schema, name) for schema, name in cur.fetchall()]


# A configuration relation's row holds its condition (the WHERE clause pg_dump dumps its
# rows by: "" for all); the sequences a configuration table owns (serial, identity) and
# no extension marks come second, with none.
_EXTENSION_CONFIGURATION = """
SELECT n.nspname, c.relname, c.relkind, config.condition
FROM pg_catalog.pg_extension e
CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(e.extconfig), pg_catalog.unnest(e.extcondition)) AS config(oid, condition)
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) config.oid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
UNION ALL
SELECT n.nspname, s.relname, s.relkind, NULL
FROM pg_catalog.pg_extension e
CROSS JOIN LATERAL pg_catalog.unnest(e.extconfig) AS config(oid)
JOIN pg_catalog.pg_depend d ON d.refobjid OPERATOR(pg_catalog.=) config.oid
    AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
    AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
    AND d.deptype OPERATOR(pg_catalog.=) ANY(ARRAY['a', 'i']::"char"[])
JOIN pg_catalog.pg_class s ON s.oid OPERATOR(pg_catalog.=) d.objid AND s.relkind OPERATOR(pg_catalog.=) 'S'
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) s.relnamespace
ORDER BY 1, 2, 4
"""


@dataclass(frozen=True)
class Configuration:
    """A configuration table or sequence of an extension: marked by
    `pg_extension_config_dump`, whose rows (those `condition` keeps) or value pg_dump
    dumps as the user's data; or (`condition` None) a sequence such a table owns."""

    schema: str
    name: str
    relkind: str
    condition: str | None

    @property
    def key(self) -> str:
        return table_key(self.schema, self.name)

    @property
    def is_table(self) -> bool:
        return self.relkind == "r"


def extension_configuration(conn: psycopg2.extensions.connection) -> list[Configuration]:
    """The configuration tables and sequences of the database's extensions. Members of
    an extension, so `list_tables` leaves them out."""
    found: dict[tuple[str, str], Configuration] = {}
    with conn.cursor() as cur:
        cur.execute(_EXTENSION_CONFIGURATION)
        for schema, name, relkind, condition in cur.fetchall():
            found.setdefault((schema, name), Configuration(schema, name, relkind, condition))
    return list(found.values())


def count_configuration(
    conn: psycopg2.extensions.connection, relations: list[Configuration]
) -> dict[str, int]:
    """Exact counts of the rows pg_dump dumps of each configuration table among
    `relations`: those its extension's condition keeps (PostGIS's `spatial_ref_sys`
    leaves out the SRIDs it ships), keyed "schema.table". The condition is the
    extension's own text from the catalog (`pg_extension.extcondition`, which only its
    script, run by a superuser, can set), run as pg_dump runs it."""
    counts: dict[str, int] = {}
    with conn.cursor() as cur:
        for relation in relations:
            if not relation.is_table:
                continue
            table = sql.Identifier(relation.schema, relation.name)
            if relation.condition:
                # As pg_dump selects them: COPY (SELECT … FROM t <condition>), whatever the
                # condition holds (an ORDER BY, a LIMIT), the table's children included.
                query = sql.SQL("SELECT pg_catalog.count(*) FROM (SELECT 1 FROM {} {}) AS dumped").format(
                    table, sql.SQL(relation.condition)
                )
            else:
                query = sql.SQL("SELECT pg_catalog.count(*) FROM ONLY {}").format(table)
            cur.execute(query)
            counts[relation.key] = int(one_row(cur)[0])
    return counts


def count_rows(
    conn: psycopg2.extensions.connection, tables: list[tuple[str, str]] | None = None
) -> dict[str, int]:
    """Exact `count(*)` of every table, keyed "schema.table"."""
    if tables is None:
        tables = list_tables(conn)
    counts: dict[str, int] = {}
    with conn.cursor() as cur:
        for schema, name in tables:
            cur.execute(
                sql.SQL("SELECT pg_catalog.count(*) FROM ONLY {}").format(sql.Identifier(schema, name))
            )
            counts[table_key(schema, name)] = int(one_row(cur)[0])
    return counts


def count_partition_trees(conn: psycopg2.extensions.connection, keys: list[str]) -> dict[str, int]:
    """Exact `count(*)` of the whole partition tree of each partitioned table among
    `keys` ("schema.table"); keys that name no partitioned table are left out.

    A dump made with `pg_dump --load-via-partition-root` loads every partition's rows
    through the root (`COPY root FROM stdin`), so what it says it holds is counted by
    root: the tree's total is what compares with it."""
    counts: dict[str, int] = {}
    with conn.cursor() as cur:
        for key in keys:
            # By the whole key: a schema or table name may itself hold a dot.
            cur.execute(
                "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace WHERE c.relkind OPERATOR(pg_catalog.=) 'p' "
                "AND n.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) c.relname OPERATOR(pg_catalog.=) %s",
                (key,),
            )
            for schema, name in cur.fetchall():
                cur.execute(
                    sql.SQL("SELECT pg_catalog.count(*) FROM {}").format(sql.Identifier(schema, name))
                )
                counts[key] = int(one_row(cur)[0])
    return counts


def is_empty(conn: psycopg2.extensions.connection) -> bool:
    """True when the database holds no user objects beyond the default public schema."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT
              (SELECT pg_catalog.count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND NOT (n.nspname OPERATOR(pg_catalog.~~) 'pg\\_toast%%') AND NOT (n.nspname OPERATOR(pg_catalog.~~) 'pg\\_temp\\_%%'))
            + (SELECT pg_catalog.count(*) FROM pg_namespace
                 WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')
                   AND NOT (nspname OPERATOR(pg_catalog.~~) 'pg\\_toast%%') AND NOT (nspname OPERATOR(pg_catalog.~~) 'pg\\_temp\\_%%'))
            + (SELECT pg_catalog.count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
            + (SELECT pg_catalog.count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND t.typtype IN ('d', 'e', 'r', 'm')
               )
            """
        )
        return int(one_row(cur)[0]) == 0


def compare_counts(source: dict[str, int], target: dict[str, int]) -> list[str]:
    """Problems found comparing row counts: missing tables and count mismatches."""
    problems = []
    for table, expected in sorted(source.items()):
        if table not in target:
            problems.append(f"table {table} is missing")
        elif target[table] != expected:
            problems.append(f"table {table} has {target[table]} rows, the source has {expected}")
    return problems


# Objects that belong to an extension are recreated by it: never counted.
_NOT_EXTENSION_MEMBER = """NOT EXISTS (SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_catalog.{cat}'::pg_catalog.regclass AND d.objid = {oid} AND d.deptype = 'e')"""
_USER_NAMESPACE = "NOT IN ('pg_catalog', 'information_schema') AND NOT ({ns} OPERATOR(pg_catalog.~~) 'pg\\_toast%%') AND NOT ({ns} OPERATOR(pg_catalog.~~) 'pg\\_temp\\_%%')"


def _class_count(relkinds: str, extra: str = "") -> str:
    return f"""(SELECT pg_catalog.count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ({relkinds}) AND n.nspname {_USER_NAMESPACE.format(ns="n.nspname")}
        AND {_NOT_EXTENSION_MEMBER.format(cat="pg_class", oid="c.oid")} {extra})"""


OBJECT_KIND_QUERIES = {
    "tables": _class_count("'r', 'p'", "AND NOT c.relispartition"),
    "partitions": _class_count("'r', 'p'", "AND c.relispartition"),
    "indexes": _class_count("'i', 'I'"),
    "sequences": _class_count("'S'"),
    "views": _class_count("'v'"),
    "materialized_views": _class_count("'m'"),
    "constraints": f"""(SELECT pg_catalog.count(*) FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE k.contype IN ('p', 'u', 'f', 'c', 'x') AND k.conparentid = 0
        AND n.nspname {_USER_NAMESPACE.format(ns="n.nspname")}
        AND {_NOT_EXTENSION_MEMBER.format(cat="pg_class", oid="c.oid")})""",
    "functions": f"""(SELECT pg_catalog.count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname {_USER_NAMESPACE.format(ns="n.nspname")}
        AND {_NOT_EXTENSION_MEMBER.format(cat="pg_proc", oid="p.oid")})""",
    "triggers": f"""(SELECT pg_catalog.count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND n.nspname {_USER_NAMESPACE.format(ns="n.nspname")})""",
    "types": f"""(SELECT pg_catalog.count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE (t.typtype IN ('e', 'r', 'm') OR (t.typtype = 'c' AND c.relkind = 'c'))
        AND n.nspname {_USER_NAMESPACE.format(ns="n.nspname")}
        AND {_NOT_EXTENSION_MEMBER.format(cat="pg_type", oid="t.oid")})""",
    "domains": f"""(SELECT pg_catalog.count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typtype = 'd' AND n.nspname {_USER_NAMESPACE.format(ns="n.nspname")}
        AND {_NOT_EXTENSION_MEMBER.format(cat="pg_type", oid="t.oid")})""",
    "policies": "(SELECT pg_catalog.count(*) FROM pg_policy)",
    "large_objects": "(SELECT pg_catalog.count(*) FROM pg_largeobject_metadata)",
    "extensions": "(SELECT pg_catalog.count(*) FROM pg_extension)",
    "event_triggers": "(SELECT pg_catalog.count(*) FROM pg_event_trigger)",
}


def object_counts(conn: psycopg2.extensions.connection) -> dict[str, int]:
    """How many objects of each kind the database holds (user objects only)."""
    names = list(OBJECT_KIND_QUERIES)
    query = "SELECT " + ", ".join(OBJECT_KIND_QUERIES[name] for name in names)
    with conn.cursor() as cur:
        cur.execute(query)
        row = one_row(cur)
    return {name: int(value) for name, value in zip(names, row, strict=True)}


# A sequence whose value pg_dump dumps: not an extension's, or one its extension marks as
# configuration (an extension's other sequences stay as its CREATE EXTENSION made them).
_SEQUENCES = (
    "FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
    "WHERE c.relkind OPERATOR(pg_catalog.=) 'S' AND n.nspname <> ALL (ARRAY['pg_catalog', 'information_schema']) "
    "AND (NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid OPERATOR(pg_catalog.=) "
    "'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid OPERATOR(pg_catalog.=) c.oid "
    "AND d.deptype OPERATOR(pg_catalog.=) 'e') OR EXISTS (SELECT 1 FROM pg_catalog.pg_extension e "
    "WHERE c.oid OPERATOR(pg_catalog.=) ANY(e.extconfig)))"
)


def sequence_values(conn: psycopg2.extensions.connection) -> dict[str, int | None]:
    """Every sequence's last value ("schema.name" -> value, None if never used).

    In one statement on a connection inside a transaction (the source's snapshot); on
    an autocommit connection (the preview) one sequence per statement, since reading a
    sequence locks it until the transaction ends, and a database of some thousands of
    sequences would fill the cluster's shared lock table."""
    with conn.cursor() as cur:
        if not conn.autocommit:
            # What pg_sequences shows (no value without the privilege to read it).
            cur.execute(
                "SELECT n.nspname, c.relname, CASE WHEN pg_catalog.has_sequence_privilege(c.oid, 'SELECT,USAGE') "
                "THEN pg_catalog.pg_sequence_last_value(c.oid) END " + _SEQUENCES + " ORDER BY 1, 2"
            )
            return {
                f"{schema}.{name}": (int(v) if v is not None else None) for schema, name, v in cur.fetchall()
            }
        cur.execute("SELECT c.oid, n.nspname, c.relname " + _SEQUENCES + " ORDER BY 2, 3")
        values: dict[str, int | None] = {}
        for oid, schema, name in cur.fetchall():
            cur.execute("SELECT pg_catalog.pg_sequence_last_value(%s::pg_catalog.oid)", (oid,))
            value = one_row(cur)[0]
            values[f"{schema}.{name}"] = int(value) if value is not None else None
        return values


def extension_versions(conn: psycopg2.extensions.connection) -> dict[str, str]:
    with conn.cursor() as cur:
        cur.execute("SELECT extname, extversion FROM pg_extension ORDER BY 1")
        return dict(cur.fetchall())


def extension_schemas(conn: psycopg2.extensions.connection) -> dict[str, str]:
    """Extension name -> the schema it lives in."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace ORDER BY 1"
        )
        return dict(cur.fetchall())


def describe(conn: psycopg2.extensions.connection) -> dict[str, Any]:
    """Everything the verification report compares, for one side."""
    return {
        "objects": object_counts(conn),
        "sequences": sequence_values(conn),
        "extensions": extension_versions(conn),
    }


# Policies for roles other than PUBLIC. Any role of the cluster can be named in a
# policy without being a member of it (another tenant's, the superuser, the import's
# own restore role): such a policy ties the project's database to a role that is not
# the project's (the role could then not be dropped) and tells which role names exist.
_POLICIES_FOR_ROLES = """
SELECT n.nspname, c.relname, p.polname,
       pg_catalog.array_to_string(ARRAY(
           SELECT pg_catalog.quote_ident(r.rolname) FROM pg_catalog.pg_roles r
           WHERE r.oid OPERATOR(pg_catalog.=) ANY (p.polroles) ORDER BY 1), ', ')
FROM pg_catalog.pg_policy p
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.polrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE p.polroles OPERATOR(pg_catalog.<>) '{0}'::pg_catalog.oid[]
ORDER BY 1, 2, 3
"""


def policies_for_roles(conn: psycopg2.extensions.connection) -> list[tuple[str, str, str, str]]:
    """(schema, table, policy, roles) of every policy for roles other than PUBLIC."""
    with conn.cursor() as cur:
        cur.execute(_POLICIES_FOR_ROLES)
        return cur.fetchall()
