"""The fidelity fixture (tests/fixtures/fidelity.sql) and what a managed restore does with it.

(a) the fixture loads into an empty database and holds what it promises;
(b) it survives the round trip the managed target performs, as a NON-superuser:

    superuser:  CREATE ROLE capy_fx_<hex> LOGIN (no superuser, no createdb, no createrole)
                CREATE DATABASE <target> OWNER capy_fx_<hex>
                in <target>: CREATE SCHEMA ext AUTHORIZATION capy_fx_<hex>;
                             CREATE EXTENSION citext WITH SCHEMA ext;
                             CREATE EXTENSION hstore WITH SCHEMA public;
                             CREATE EXTENSION pg_trgm WITH SCHEMA public;
    source:     pg_dump -Fc
    list:       pg_restore -l <archive>, with the entries of the pre-created objects
                commented out (';' prefix):  "EXTENSION - <name>",
                "COMMENT - EXTENSION <name>" and "SCHEMA - ext"
    role:       pg_restore --no-owner --no-privileges --exit-on-error --use-list=<list>
                --dbname=postgresql://capy_fx_<hex>@.../<target> <archive>

    and compares schema dumps, data dumps, exact row counts, sequences, large
    objects and materialized-view population;
(c) what tests/fixtures/superuser_objects.sql does to that same restore: the event
    trigger (and its comment) fail, the extension comment is lost or fails.

Gotchas pinned here as tests: without the list filtering, the pre-created schema and
the extensions' comments fail; with schema ext owned by the superuser instead of the
target role, everything that uses ext.citext fails. Trusted extensions (citext, hstore
and pg_trgm are trusted) need no superuser at all: the database owner can restore the
archive unfiltered into a database where nothing was pre-created.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from psycopg2 import sql

from tests.support import pg

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIDELITY = FIXTURES / "fidelity.sql"
SUPERUSER_OBJECTS = FIXTURES / "superuser_objects.sql"

# Extensions the managed target pre-creates (as a superuser), and where.
EXTENSIONS = {"citext": "ext", "hstore": "public", "pg_trgm": "public"}
PRECREATED_SCHEMAS = ("ext",)

# The error messages a non-superuser restore gets (server lc_messages is C here).
EVENT_TRIGGER_DENIED = 'permission denied to create event trigger "capy_ddl_watch"'
EVENT_TRIGGER_HINT = "Must be superuser to create an event trigger."
EVENT_TRIGGER_MISSING = 'event trigger "capy_ddl_watch" does not exist'
CITEXT_COMMENT_DENIED = "must be owner of extension citext"
SUPERUSER_CITEXT_COMMENT = "Case-insensitive text, commented by the fidelity fixture"


# --------------------------------------------------------------------------- helpers


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def load(dbname: str, script: Path) -> None:
    """psql -X -v ON_ERROR_STOP=1 -f script, as the superuser; no error, no warning."""
    result = run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg.url_for(dbname), "-f", str(script)])
    assert result.returncode == 0, f"{script.name} failed to load:\n{result.stderr}"
    assert result.stderr == "", f"{script.name} printed to stderr:\n{result.stderr}"


def url_as(role: str, dbname: str) -> str:
    """The URL of `dbname` on the test cluster, connecting as `role` (trust auth)."""
    parts = urlsplit(pg.url_for(dbname))
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{role}@{host}{port}{parts.path}"


def dump_custom(dbname: str, path: Path) -> Path:
    result = run(["pg_dump", "--format=custom", f"--file={path}", f"--dbname={pg.url_for(dbname)}"])
    assert result.returncode == 0, result.stderr
    return path


def toc(archive: Path) -> list[str]:
    result = run(["pg_restore", "--list", str(archive)])
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


_TOC_ENTRY = re.compile(r"^(?P<id>\d+); (?P<catalog>\d+) (?P<oid>\d+) (?P<rest>.*)$")


def is_precreated(line: str, schemas: tuple[str, ...] = PRECREATED_SCHEMAS) -> bool:
    """Whether a `pg_restore --list` line restores something the target pre-created.

    A line is "<dump id>; <catalog oid> <object oid> <desc> <schema> <name> <owner>";
    names are printed unquoted (a table "a""b" shows as a"b) and may hold spaces, so
    entries are recognised by their description, and the owner (the last word; empty
    for extensions) is split off before comparing a schema's name exactly.
    """
    m = _TOC_ENTRY.match(line)
    if m is None:
        return False
    rest = m["rest"]
    if rest.startswith(("EXTENSION - ", "COMMENT - EXTENSION ")):
        return True
    without_owner = rest.rsplit(" ", 1)[0]
    return any(without_owner == f"SCHEMA - {schema}" for schema in schemas)


def managed_use_list(archive: Path, out: Path) -> tuple[Path, list[str]]:
    """Write the --use-list of the managed restore: pre-created entries commented out."""
    lines, skipped = [], []
    for line in toc(archive):
        if is_precreated(line):
            skipped.append(line)
            line = ";" + line
        lines.append(line)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out, skipped


def restore_as(
    role: str, dbname: str, archive: Path, *, use_list: Path | None, exit_on_error: bool = True
) -> subprocess.CompletedProcess[str]:
    args = ["pg_restore", "--no-owner", "--no-privileges", "--no-password"]
    if exit_on_error:
        args.append("--exit-on-error")
    if use_list is not None:
        args.append(f"--use-list={use_list}")
    args += [f"--dbname={url_as(role, dbname)}", str(archive)]
    return run(args)


def server_errors(stderr: str) -> list[str]:
    """The server's ERROR lines in pg_restore's stderr, in order."""
    return re.findall(r"ERROR:  (.+)", stderr)


def data_dump(dbname: str) -> str:
    """pg_dump --data-only (rows, sequence values, large objects), normalised."""
    out = subprocess.run(
        ["pg_dump", "--data-only", "--no-owner", "--no-privileges", "-d", pg.url_for(dbname)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(
        line
        for line in out.splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))
    )


def dump_blocks(schema_dump: str) -> dict[str, str]:
    """Split a normalised pg.schema_dump() into {"-- Name: ... header": statement text}."""
    blocks: dict[str, str] = {}
    header, body = None, []
    for line in schema_dump.splitlines():
        if line.startswith("-- Name: "):
            if header is not None:
                blocks[header] = "\n".join(body)
            header, body = line, []
        elif header is not None and not line.startswith("--"):
            body.append(line)
    if header is not None:
        blocks[header] = "\n".join(body)
    return blocks


def query(dbname: str, text: str | sql.Composed, params: tuple = ()) -> list[tuple]:
    return pg.admin(text, params, dbname=dbname)


def sequences(dbname: str) -> dict[str, tuple[int, bool]]:
    """last_value and is_called of every sequence, keyed "schema.name"."""
    names = query(
        dbname,
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        ORDER BY 1, 2
        """,
    )
    out = {}
    for schema, name in names:
        (row,) = query(
            dbname, sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(schema, name))
        )
        out[f"{schema}.{name}"] = (int(row[0]), bool(row[1]))
    return out


def large_objects(dbname: str) -> dict[int, tuple[str, str | None]]:
    """{oid: (md5 of the content, comment)} of every large object."""
    rows = query(
        dbname,
        "SELECT oid::bigint, md5(lo_get(oid)), obj_description(oid, 'pg_largeobject') "
        "FROM pg_largeobject_metadata ORDER BY oid",
    )
    return {int(oid): (digest, comment) for oid, digest, comment in rows}


def matviews(dbname: str) -> dict[str, bool]:
    rows = query(dbname, "SELECT schemaname || '.' || matviewname, ispopulated FROM pg_matviews ORDER BY 1")
    return dict(rows)


def extension_comment(dbname: str, name: str) -> str | None:
    rows = query(
        dbname, "SELECT obj_description(oid, 'pg_extension') FROM pg_extension WHERE extname = %s", (name,)
    )
    return rows[0][0] if rows else None


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Target:
    role: str
    dbname: str


@pytest.fixture
def managed_target() -> Iterator[Callable[..., Target]]:
    """A non-superuser role and target databases it owns, prepared as the managed
    target prepares them: `managed_target()` -> Target. Role and databases are dropped
    afterwards, whatever happens."""
    role = pg.scratch_name("capy_fx")
    made: list[str] = []

    def make(*, precreate: bool = True, ext_owner_is_role: bool = True) -> Target:
        dbname = pg.scratch_name("capyfx_tgt")
        pg.admin(
            sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8'").format(
                sql.Identifier(dbname), sql.Identifier(role)
            )
        )
        made.append(dbname)
        if precreate:
            for schema in PRECREATED_SCHEMAS:
                owner = role if ext_owner_is_role else "postgres"
                query(
                    dbname,
                    sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                        sql.Identifier(schema), sql.Identifier(owner)
                    ),
                )
            for name, schema in EXTENSIONS.items():
                query(
                    dbname,
                    sql.SQL("CREATE EXTENSION {} WITH SCHEMA {}").format(
                        sql.Identifier(name), sql.Identifier(schema)
                    ),
                )
        return Target(role, dbname)

    try:
        pg.admin(
            sql.SQL(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
            ).format(sql.Identifier(role))
        )
        yield make
    finally:
        try:
            for dbname in made:
                pg.drop_db(dbname)
        finally:
            pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def fidelity_source(scratch_db) -> str:
    dbname = scratch_db("capyfx_src")
    load(dbname, FIDELITY)
    return dbname


# --------------------------------------------------------------------------- (a) the fixture itself


def test_fixture_file_keeps_its_rules():
    """Nothing a non-superuser target cannot restore, nothing non-deterministic."""
    text = FIDELITY.read_text(encoding="utf-8")
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())  # drop SQL comments
    forbidden = {
        r"\brandom\s*\(": "random()",
        r"\bnow\s*\(": "now()",
        r"\bcurrent_(timestamp|date|time)\b": "current time",
        r"\bclock_timestamp\b": "clock_timestamp()",
        r"\bgen_random_uuid\b": "gen_random_uuid()",
        r"\bEVENT\s+TRIGGER\b": "an event trigger",
        r"\bOWNER\s+TO\b": "OWNER TO",
        r"\b(CREATE|ALTER)\s+(ROLE|USER|GROUP)\b": "a role",
        r"\bTABLESPACE\b": "a tablespace",
        r"\bplperlu\b|\bplpython3?u\b|\bpltclu\b|\bLANGUAGE\s+c\b": "an untrusted language",
        r"\bSECURITY\s+LABEL\b": "a security label",
    }
    for pattern, what in forbidden.items():
        assert not re.search(pattern, code, re.IGNORECASE), f"fidelity.sql must not use {what}"
    for grant in re.findall(r"\bGRANT\b[^;]*;", code, re.IGNORECASE):
        assert re.search(r"\bTO\s+PUBLIC\s*;", grant, re.IGNORECASE), f"GRANT to a role: {grant}"
    for ext in re.findall(r"CREATE\s+EXTENSION\s+(\w+)", code, re.IGNORECASE):
        assert ext in EXTENSIONS, f"extension {ext} is not on the allowlist"


def test_fixture_loads_and_holds_every_kind_of_object(fidelity_source):
    db = fidelity_source

    def one(text: str, params: tuple = ()):
        rows = query(db, text, params)
        assert len(rows) == 1, (text, rows)
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    counts = pg.row_counts(db)
    assert len(counts) == 28  # ordinary tables and partitions (+ 2 partitioned parents)
    assert counts["public.empty_cols"] == 0
    assert counts["public.no_cols_rows"] == 3
    assert {t: n for t, n in counts.items() if n == 0} == {"public.empty_cols": 0}, (
        "every other table has rows"
    )
    assert one("SELECT count(*) FROM pg_class WHERE relkind = 'p'") == 2

    # Partitioning: range with 3 bounded partitions + default, list with a default.
    parts = query(
        db,
        """
        SELECT p.relname, c.relname, pg_get_expr(c.relpartbound, c.oid), pt.partstrat
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_partitioned_table pt ON pt.partrelid = p.oid
        WHERE c.relkind = 'r' ORDER BY 1, 2
        """,
    )
    measurements = [(child, bound) for parent, child, bound, strat in parts if parent == "measurements"]
    assert len(measurements) == 4 and ("measurements_default", "DEFAULT") in measurements
    assert {strat for parent, _, _, strat in parts if parent == "measurements"} == {"r"}
    regional = [child for parent, child, bound, strat in parts if parent == "regional_sales" and strat == "l"]
    assert len(regional) == 3
    for parent, child, _, _ in parts:
        schema = "public" if parent == "measurements" else "sales"
        assert counts[f"{schema}.{child}"] > 0, f"partition {child} is empty"

    # Identity, serial and bigserial columns.
    assert (
        one(
            "SELECT attidentity FROM pg_attribute WHERE attrelid = 'inventory.warehouses'::regclass AND attname = 'id'"
        )
        == "a"
    )
    assert (
        one(
            "SELECT attidentity FROM pg_attribute WHERE attrelid = 'inventory.items'::regclass AND attname = 'id'"
        )
        == "d"
    )
    assert one("SELECT pg_get_serial_sequence('sales.orders', 'id')") == "sales.orders_id_seq"
    assert one("SELECT pg_get_serial_sequence('sales.customers', 'id')") == "sales.customers_id_seq"
    assert (
        one(
            "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'sales.customers'::regclass AND attname = 'id'"
        )
        == "bigint"
    )

    # Standalone sequences: one advanced, one never used.
    seqs = sequences(db)
    assert seqs["public.invoice_number_seq"] == (2007, True)
    assert one(
        "SELECT (start_value, increment_by) = (1000, 7) FROM pg_sequences WHERE sequencename = 'invoice_number_seq'"
    )
    assert seqs["public.never_used_seq"] == (50, False)
    assert seqs["sales.reset_seq"] == (-500, False)

    # Materialized views: one populated, one WITH NO DATA.
    assert matviews(db) == {"inventory.stock_by_warehouse": True, "sales.customer_totals": False}

    # Large objects, a table referencing them, a comment on one.
    los = large_objects(db)
    assert len(los) >= 2 and sorted(los) == [424201, 424202, 424203]
    assert los[424201][1] == "Plain-text large object"
    assert (
        one(
            "SELECT count(*) FROM public.attachments a WHERE NOT EXISTS "
            "(SELECT 1 FROM pg_largeobject_metadata m WHERE m.oid = a.content)"
        )
        == 0
    )

    # Extensions from the allowlist, citext in a non-default schema; columns using them.
    assert (
        dict(
            query(
                db,
                "SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n "
                "ON n.oid = e.extnamespace WHERE e.extname <> 'plpgsql'",
            )
        )
        == EXTENSIONS
    )
    assert (
        one(
            "SELECT count(DISTINCT a.atttypid) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relkind = 'r' AND a.attnum > 0 "
            "AND a.atttypid IN ('ext.citext'::regtype, 'public.hstore'::regtype, 'public.email'::regtype)"
        )
        == 3
    )

    # Row-level security, enabled and forced, two policies TO PUBLIC.
    assert (
        one(
            "SELECT (relrowsecurity, relforcerowsecurity) FROM pg_class WHERE oid = 'public.tenant_notes'::regclass"
        )
        == "(t,t)"
    )
    policies = query(
        db,
        "SELECT polname, polroles::text, polqual IS NOT NULL, polwithcheck IS NOT NULL FROM pg_policy ORDER BY 1",
    )
    assert [(name, roles) for name, roles, _, _ in policies] == [
        ("tenant_notes_read", "{0}"),
        ("tenant_notes_write", "{0}"),
    ]
    assert [(using, check) for _, _, using, check in policies] == [(True, False), (False, True)]

    # Generated columns, domains (one non-ASCII, with CHECKs), enums, composite column types.
    assert one("SELECT count(*) FROM pg_attribute WHERE attgenerated = 's'") >= 4
    assert (
        one('SELECT count(*) FROM pg_constraint WHERE contypid = \'"Ünïcødé"."straße_länge"\'::regtype') == 2
    )
    assert (
        one("SELECT count(*) FROM pg_type WHERE typtype = 'e' AND typnamespace <> 'pg_catalog'::regnamespace")
        == 2
    )
    assert (
        one(
            "SELECT count(*) FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE t.typtype = 'c' AND t.typrelid <> 0 AND c.relkind = 'r' AND "
            "(SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'"
        )
        >= 3
    )

    # Comments on tables, columns, functions, types, schemas.
    for check in (
        "SELECT obj_description('inventory.items'::regclass, 'pg_class')",
        'SELECT col_description(\'"Ünïcødé"."MixedCase"\'::regclass, 2)',
        "SELECT obj_description('public.add_tax(numeric, numeric)'::regprocedure, 'pg_proc')",
        "SELECT obj_description('public.mood'::regtype, 'pg_type')",
        "SELECT obj_description('\"Ünïcødé\"'::regnamespace, 'pg_namespace')",
        "SELECT obj_description('public'::regnamespace, 'pg_namespace')",
    ):
        assert one(check), check

    # Identifiers: non-ASCII, quoted, mixed case, reserved, embedded quotes, 63 bytes.
    for regclass in ('"Ünïcødé"."MixedCase"', 'public."select"', 'public."a""b"'):
        one("SELECT %s::regclass", (regclass,))
    assert (
        one(
            "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relkind = 'r' AND a.attname IN ('Spaced Name', 'a\"b', 'ñandú 🦫')"
        )
        == 3
    )
    assert one("SELECT count(*) FROM pg_class WHERE relkind = 'r' AND octet_length(relname) = 63") == 2
    assert (
        one(
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND octet_length(relname) = 63 "
            "AND length(relname) = 63 AND relnamespace = 'inventory'::regnamespace"
        )
        == 1
    )
    assert (
        one(
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND octet_length(relname) = 63 "
            "AND length(relname) < 63 AND relnamespace = 'public'::regnamespace"
        )
        == 1
    )
    assert (
        one(
            "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relkind = 'r' AND octet_length(a.attname) = 63 AND length(a.attname) < 63"
        )
        == 1
    )
    assert one("SELECT count(*) FROM pg_class WHERE relkind = 'i' AND octet_length(relname) = 63") >= 1
    assert one("SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND octet_length(conname) = 63") == 1
    assert one("SELECT count(*) FROM pg_class WHERE relnatts = 0 AND relkind = 'r'") == 2

    # Views, functions, trigger, aggregate, index kinds, constraint kinds.
    assert (
        one(
            "SELECT count(*) FROM pg_views WHERE definition IS NOT NULL AND schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        == 3
    )
    assert one("SELECT count(*) FROM pg_class WHERE relkind = 'v' AND reloptions::text ~ 'check_option'") == 2
    langs = {
        r[0]
        for r in query(
            db,
            "SELECT DISTINCT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
            "WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) "
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')",
        )
    }
    assert {"sql", "plpgsql"} <= langs
    assert one("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 1
    assert (
        one(
            "SELECT count(*) FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid WHERE p.pronamespace = 'public'::regnamespace "
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"
        )
        == 2
    )
    methods = {
        r[0]
        for r in query(
            db,
            "SELECT DISTINCT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
            "WHERE c.relkind = 'i' AND c.relnamespace <> 'pg_catalog'::regnamespace",
        )
    }
    assert {"btree", "gin", "gist", "hash", "brin"} <= methods
    assert one("SELECT count(*) FROM pg_index WHERE indpred IS NOT NULL") >= 1
    assert one("SELECT count(*) FROM pg_index WHERE indexprs IS NOT NULL") >= 1
    assert one("SELECT count(*) FROM pg_index WHERE indisunique AND NOT indisprimary") >= 1
    kinds = {r[0] for r in query(db, "SELECT DISTINCT contype FROM pg_constraint WHERE conrelid <> 0")}
    assert {"c", "u", "f", "x", "p"} <= kinds
    assert one("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND condeferrable") == 1
    assert (
        one(
            "SELECT count(*) FROM pg_constraint k JOIN pg_class a ON a.oid = k.conrelid JOIN pg_class b ON b.oid = k.confrelid "
            "WHERE k.contype = 'f' AND a.relnamespace <> b.relnamespace"
        )
        >= 2
    )

    # Nothing a non-superuser owner could not restore.
    assert one("SELECT count(*) FROM pg_event_trigger") == 0
    assert (
        one(
            "SELECT count(*) FROM pg_class WHERE reltablespace <> 0 AND relnamespace NOT IN "
            "('pg_catalog'::regnamespace, 'pg_toast'::regnamespace)"
        )
        == 0
    )
    assert (
        one(
            "SELECT count(*) FROM pg_class c WHERE c.relowner <> 'postgres'::regrole "
            "AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)"
        )
        == 0
    )


def test_fixture_is_deterministic(fidelity_source, scratch_db):
    """Loaded twice, the fixture gives identical schemas, rows, sequences and large objects."""
    again = scratch_db("capyfx_again")
    load(again, FIDELITY)
    assert pg.schema_dump(again) == pg.schema_dump(fidelity_source)
    assert data_dump(again) == data_dump(fidelity_source)


# --------------------------------------------------------------------------- (b) the managed round trip


def assert_same_database(source: str, target: str) -> None:
    """Everything an import must preserve, compared between two databases."""
    assert pg.schema_dump(target) == pg.schema_dump(source)
    assert data_dump(target) == data_dump(source)
    source_counts = pg.row_counts(source)
    assert pg.row_counts(target) == source_counts
    assert sequences(target) == sequences(source)
    assert large_objects(target) == large_objects(source)
    assert len(large_objects(target)) == 3
    assert matviews(target) == matviews(source)
    assert matviews(target)["sales.customer_totals"] is False


def test_managed_restore_as_non_superuser_round_trips(fidelity_source, managed_target, tmp_path):
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    use_list, skipped = managed_use_list(archive, tmp_path / "restore.list")
    # Exactly the pre-created objects are skipped: 3 extensions, their comments, schema ext.
    described = sorted(_TOC_ENTRY.match(line)["rest"].rsplit(" ", 1)[0] for line in skipped)
    assert described == [
        "COMMENT - EXTENSION citext",
        "COMMENT - EXTENSION hstore",
        "COMMENT - EXTENSION pg_trgm",
        "EXTENSION - citext",
        "EXTENSION - hstore",
        "EXTENSION - pg_trgm",
        "SCHEMA - ext",
    ]

    target = managed_target()
    result = restore_as(target.role, target.dbname, archive, use_list=use_list)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    assert_same_database(fidelity_source, target.dbname)
    # Owned by the restoring role, as --no-owner leaves it; RLS still enforced on it.
    assert query(
        target.dbname,
        "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'public.tenant_notes'::regclass",
    ) == [(target.role,)]
    assert query(
        target.dbname,
        "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class "
        "WHERE oid = 'public.tenant_notes'::regclass",
    ) == [(True,)]
    conn = psycopg2.connect(url_as(target.role, target.dbname))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM public.tenant_notes")  # FORCE: the owner sees no tenant's rows
            assert cur.fetchone()[0] == 0
            cur.execute("SET capy.tenant = 'acme'")
            cur.execute("SELECT count(*) FROM public.tenant_notes")
            assert cur.fetchone()[0] == 2
    finally:
        conn.close()


def test_parallel_restore_with_the_same_list_round_trips(fidelity_source, managed_target, tmp_path):
    """The product restores with --jobs; the use-list works the same way there."""
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    use_list, _ = managed_use_list(archive, tmp_path / "restore.list")
    target = managed_target()
    result = run(
        [
            "pg_restore",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--jobs=4",
            f"--use-list={use_list}",
            f"--dbname={url_as(target.role, target.dbname)}",
            str(archive),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert_same_database(fidelity_source, target.dbname)


def test_gotcha_unfiltered_list_fails_on_precreated_objects(fidelity_source, managed_target, tmp_path):
    """Without the use-list, the pre-created schema and the superuser-owned extensions'
    comments fail (CREATE EXTENSION IF NOT EXISTS itself is a harmless no-op)."""
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    target = managed_target()

    first = restore_as(target.role, target.dbname, archive, use_list=None)
    assert first.returncode == 1
    assert server_errors(first.stderr) == ['schema "ext" already exists']

    target = managed_target()
    every = restore_as(target.role, target.dbname, archive, use_list=None, exit_on_error=False)
    assert every.returncode == 1
    assert server_errors(every.stderr) == [
        'schema "ext" already exists',
        "must be owner of extension citext",
        "must be owner of extension hstore",
        "must be owner of extension pg_trgm",
    ]
    assert "errors ignored on restore: 4" in every.stderr


def test_gotcha_schema_ext_must_belong_to_the_restoring_role(fidelity_source, managed_target, tmp_path):
    """With `CREATE SCHEMA ext` owned by the superuser, the role may neither comment on
    it nor use ext.citext (no USAGE): the first failure is the schema's comment."""
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    use_list, _ = managed_use_list(archive, tmp_path / "restore.list")
    target = managed_target(ext_owner_is_role=False)
    result = restore_as(target.role, target.dbname, archive, use_list=use_list, exit_on_error=False)
    assert result.returncode == 1
    errors = server_errors(result.stderr)
    assert errors[0] == "must be owner of schema ext"
    assert errors[1] == "permission denied for schema ext"  # CREATE DOMAIN public.email AS ext.citext


def test_alternative_trusted_extensions_need_no_precreation(fidelity_source, managed_target, tmp_path):
    """citext, hstore and pg_trgm are trusted extensions: the database owner may create
    them, so into a database where nothing was pre-created the UNFILTERED archive
    restores as the owner, and the extensions (and their comments) belong to it."""
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    target = managed_target(precreate=False)
    result = restore_as(target.role, target.dbname, archive, use_list=None)
    assert result.returncode == 0, result.stderr
    assert_same_database(fidelity_source, target.dbname)
    owners = dict(
        query(
            target.dbname,
            "SELECT extname, extowner::regrole::text FROM pg_extension WHERE extname <> 'plpgsql'",
        )
    )
    assert owners == dict.fromkeys(EXTENSIONS, target.role)


# --------------------------------------------------------------------------- (c) superuser-only objects


def test_superuser_objects_fail_a_non_superuser_restore(fidelity_source, managed_target, tmp_path):
    """superuser_objects.sql on top of the fixture, restored the managed way.

    TOC entries it adds:  FUNCTION public capy_ddl_watch_fn() (+ COMMENT)  -> restores
                          EVENT TRIGGER - capy_ddl_watch                 -> fails
                          COMMENT - EVENT TRIGGER capy_ddl_watch         -> fails
                          (COMMENT - EXTENSION citext, changed text)     -> skipped by the list
    """
    load(fidelity_source, SUPERUSER_OBJECTS)
    archive = dump_custom(fidelity_source, tmp_path / "superuser.dump")
    entries = [_TOC_ENTRY.match(line)["rest"] for line in toc(archive) if _TOC_ENTRY.match(line)]
    assert "EVENT TRIGGER - capy_ddl_watch postgres" in entries
    assert "COMMENT - EVENT TRIGGER capy_ddl_watch postgres" in entries
    use_list, _ = managed_use_list(archive, tmp_path / "restore.list")

    # --exit-on-error (as the product runs it): stops at the event trigger.
    target = managed_target()
    stopped = restore_as(target.role, target.dbname, archive, use_list=use_list)
    assert stopped.returncode == 1
    assert server_errors(stopped.stderr) == [EVENT_TRIGGER_DENIED]
    assert f"HINT:  {EVENT_TRIGGER_HINT}" in stopped.stderr
    assert "Command was: CREATE EVENT TRIGGER capy_ddl_watch ON ddl_command_end" in stopped.stderr

    # Without --exit-on-error: exactly two entries fail, everything else restores.
    target = managed_target()
    every = restore_as(target.role, target.dbname, archive, use_list=use_list, exit_on_error=False)
    assert every.returncode == 1
    assert server_errors(every.stderr) == [EVENT_TRIGGER_DENIED, EVENT_TRIGGER_MISSING]
    assert "errors ignored on restore: 2" in every.stderr

    source_blocks = dump_blocks(pg.schema_dump(fidelity_source))
    target_blocks = dump_blocks(pg.schema_dump(target.dbname))
    missing = sorted(set(source_blocks) - set(target_blocks))
    assert missing == [
        "-- Name: EVENT TRIGGER capy_ddl_watch; Type: COMMENT; Schema: -; Owner: -",
        "-- Name: capy_ddl_watch; Type: EVENT TRIGGER; Schema: -; Owner: -",
    ]
    assert set(target_blocks) - set(source_blocks) == set()
    changed = [h for h in source_blocks if h in target_blocks and source_blocks[h] != target_blocks[h]]
    assert changed == ["-- Name: EXTENSION citext; Type: COMMENT; Schema: -; Owner: -"]
    # The function the event trigger calls is an ordinary function: it was restored.
    assert query(target.dbname, "SELECT 'public.capy_ddl_watch_fn()'::regprocedure::text") == [
        ("capy_ddl_watch_fn()",)
    ]
    # The list skipped the extension comment: the target keeps the extension's own.
    assert extension_comment(fidelity_source, "citext") == SUPERUSER_CITEXT_COMMENT
    assert extension_comment(target.dbname, "citext") == "data type for case-insensitive character strings"
    assert data_dump(target.dbname) == data_dump(fidelity_source)
    assert pg.row_counts(target.dbname) == pg.row_counts(fidelity_source)

    # Unfiltered, the extension comment fails too (the superuser owns citext).
    target = managed_target()
    unfiltered = restore_as(target.role, target.dbname, archive, use_list=None, exit_on_error=False)
    errors = server_errors(unfiltered.stderr)
    assert CITEXT_COMMENT_DENIED in errors
    assert errors[-2:] == [EVENT_TRIGGER_DENIED, EVENT_TRIGGER_MISSING]
