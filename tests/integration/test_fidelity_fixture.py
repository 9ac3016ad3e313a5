"""The fidelity fixture (tests/fixtures/fidelity.sql) through the product's own restore path.

(a) the fixture loads into an empty database and holds what it promises (so the tests
    that import it, here and in test_fidelity_import.py, cover every kind of object);
(b) the product's planner (`stages.dumps.toc.read` and `plan`) decides what the project's
    role restores of its archive: exactly the objects the service creates itself (the
    allowlisted extensions, their comments, the schema one of them lives in) are left
    out, and nothing is skipped; the product's restore (`stages.tools.restore.restore_archive`,
    one job and several) into a preview prepared as an import prepares it
    (`stages.database.cluster.ClusterAdmin`: the restore role owns it, the service created the
    extensions) gives back the source: schema, data, counts, sequences, large objects,
    materialized-view population;
(c) with tests/fixtures/superuser_objects.sql on top, the planner skips exactly the event
    trigger and its comment, with their reasons, the restore completes without them,
    and the extension's own comment is the source's (the service applies it).

Whole imports of the fixture (live, custom, plain; the report field by field) are in
tests/integration/test_fidelity_import.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg2 import sql

from stages.connections.pgurl import SourceURL
from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.dumps import toc
from stages.tools.commands import PgTools
from stages.tools.restore import restore_archive
from tests.support import pg

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIDELITY = FIXTURES / "fidelity.sql"
SUPERUSER_OBJECTS = FIXTURES / "superuser_objects.sql"

# Extensions the fixture uses, and where (all on the service's allowlist).
EXTENSIONS = {"citext": "ext", "hstore": "public", "pg_trgm": "public"}
SUPERUSER_CITEXT_COMMENT = "Case-insensitive text, commented by the fidelity fixture"

ADMIN = ClusterAdmin(pg.ADMIN_URL)
TOOLS = PgTools(os.path.dirname(shutil.which("pg_restore") or "/usr/bin/pg_restore"))


# --------------------------------------------------------------------------- helpers


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def load(dbname: str, script: Path) -> None:
    """psql -X -v ON_ERROR_STOP=1 -f script, as the superuser; no error, no warning."""
    result = run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg.url_for(dbname), "-f", str(script)])
    assert result.returncode == 0, f"{script.name} failed to load:\n{result.stderr}"
    assert result.stderr == "", f"{script.name} printed to stderr:\n{result.stderr}"


def dump_custom(dbname: str, path: Path) -> Path:
    result = run(["pg_dump", "--format=custom", f"--file={path}", f"--dbname={pg.url_for(dbname)}"])
    assert result.returncode == 0, result.stderr
    return path


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
class Preview:
    dbname: str
    restorer: RoleLogin

    def url(self) -> SourceURL:
        return ADMIN.role_url(self.dbname, self.restorer).with_params(sslmode="disable")


@pytest.fixture
def fidelity_source(scratch_db) -> str:
    dbname = scratch_db("capyfx_src")
    load(dbname, FIDELITY)
    return dbname


@pytest.fixture
def preview_for() -> Iterator[Callable[[Path, str], tuple[Preview, toc.RestorePlan]]]:
    """`preview_for(archive, work_dir)`: plan the archive as an import does and prepare
    a preview for it the same way (restore role, database it owns, the service's
    extensions with the source's comments). Dropped afterwards."""
    made: list[Preview] = []

    def make(archive: Path, work: str) -> tuple[Preview, toc.RestorePlan]:
        entries = toc.read(TOOLS, str(archive))
        extensions = toc.extension_schemas(TOOLS, str(archive), entries, work)
        comments = toc.extension_comments(TOOLS, str(archive), entries, work)
        plan = toc.plan(entries, precreated_schemas=set(extensions.values()) - {"public"})
        preview = Preview(
            pg.scratch_name("capyfx_preview"), ADMIN.ensure_restore_role(pg.scratch_name("capyfx_restore"))
        )
        made.append(preview)
        ADMIN.create_database(preview.dbname, owner=preview.restorer.name)
        ADMIN.create_extensions(preview.dbname, preview.restorer.name, extensions, comments)
        return preview, plan

    try:
        yield make
    finally:
        for preview in made:
            ADMIN.drop_database(preview.dbname)
            ADMIN.drop_role(preview.restorer.name)


def restore(preview: Preview, archive: Path, plan: toc.RestorePlan, work: Path, *, jobs: int) -> None:
    list_file = work / "restore.list"
    list_file.write_text(plan.list_file(), encoding="utf-8")
    restore_archive(TOOLS, preview.url(), str(archive), jobs=jobs, fmt="custom", list_file=str(list_file))


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


# --------------------------------------------------------------------------- (b) the product's restore


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


def test_the_planner_leaves_out_only_what_the_service_creates(fidelity_source, preview_for, tmp_path):
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    entries = toc.read(TOOLS, str(archive))
    _, plan = preview_for(archive, str(tmp_path))
    assert plan.skipped == []
    assert sorted(plan.extensions) == sorted(EXTENSIONS)
    left_out = sorted(e.label for e in entries if e not in plan.keep)
    assert left_out == [
        "COMMENT EXTENSION citext",
        "COMMENT EXTENSION hstore",
        "COMMENT EXTENSION pg_trgm",
        "EXTENSION citext",
        "EXTENSION hstore",
        "EXTENSION pg_trgm",
        "SCHEMA ext",
    ]


@pytest.mark.parametrize("jobs", [1, 4])
def test_the_products_restore_gives_back_the_fixture(fidelity_source, preview_for, tmp_path, jobs):
    archive = dump_custom(fidelity_source, tmp_path / "fidelity.dump")
    preview, plan = preview_for(archive, str(tmp_path))
    restore(preview, archive, plan, tmp_path, jobs=jobs)
    assert_same_database(fidelity_source, preview.dbname)
    # Owned by the restore role, as --no-owner leaves it; row-level security kept, forced.
    assert query(
        preview.dbname,
        "SELECT relowner::regrole::text, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE oid = 'public.tenant_notes'::regclass",
    ) == [(preview.restorer.name, True, True)]
    # The schema the service created for citext belongs to the restore role.
    assert query(
        preview.dbname, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'ext'"
    ) == [(preview.restorer.name,)]


# --------------------------------------------------------------------------- (c) superuser-only objects


def test_superuser_objects_are_planned_out_and_the_rest_restores(fidelity_source, preview_for, tmp_path):
    """superuser_objects.sql on top of the fixture: an event trigger (and its comment),
    the ordinary function it calls, and a new comment on the extension citext."""
    load(fidelity_source, SUPERUSER_OBJECTS)
    archive = dump_custom(fidelity_source, tmp_path / "superuser.dump")
    preview, plan = preview_for(archive, str(tmp_path))
    assert plan.skipped == [
        {
            "object": "EVENT TRIGGER capy_ddl_watch",
            "reason": "event triggers need superuser, which a managed database does not grant",
        },
        {
            "object": "COMMENT EVENT TRIGGER capy_ddl_watch",
            "reason": "the object it comments on needs superuser and was skipped",
        },
    ]
    restore(preview, archive, plan, tmp_path, jobs=2)

    source_blocks = dump_blocks(pg.schema_dump(fidelity_source))
    target_blocks = dump_blocks(pg.schema_dump(preview.dbname))
    assert sorted(set(source_blocks) - set(target_blocks)) == [
        "-- Name: EVENT TRIGGER capy_ddl_watch; Type: COMMENT; Schema: -; Owner: -",
        "-- Name: capy_ddl_watch; Type: EVENT TRIGGER; Schema: -; Owner: -",
    ]
    assert set(target_blocks) - set(source_blocks) == set()
    assert [h for h in source_blocks if h in target_blocks and source_blocks[h] != target_blocks[h]] == []
    # The function the event trigger calls is an ordinary function: it was restored.
    assert query(preview.dbname, "SELECT 'public.capy_ddl_watch_fn()'::regprocedure::text") == [
        ("capy_ddl_watch_fn()",)
    ]
    # The service, the extension's owner, applied the source's comment on it.
    assert extension_comment(preview.dbname, "citext") == SUPERUSER_CITEXT_COMMENT
    assert data_dump(preview.dbname) == data_dump(fidelity_source)
    assert pg.row_counts(preview.dbname) == pg.row_counts(fidelity_source)
