"""The schema rehearsal: dumps holding what a managed target cannot hold either import
with exactly those objects skipped and listed, or are refused before anything changes,
with every problem and what to change.

Sources are built in the test as the superuser, dumped, and imported through the
product (in-process runner, real Postgres, pg tools and S3).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.imports import ImportRequest
from pipeline.preflights import run_preflight
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from stages.preflight import SCHEMA_REHEARSAL, UPLOAD_CHECKS
from tests.support import pg
from tests.support.imports import create_upload, run_import, upload_and_import
from tests.support.uploading import upload_file
from tests.support.world import make_world

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANAGED_KINDS = FIXTURES / "managed_target_kinds.sql"

C_LANGUAGE = "a managed database cannot hold it as the project's role (permission denied for language c)"
BASE_TYPE = "must be superuser to create a base type"


def _depends(on: str, why: str) -> str:
    return f"it depends on {on}, which is skipped ({why})"


def expected_skips(outsider: str) -> dict[str, str]:
    """Every object of managed_target_kinds.sql the import leaves out, with its reason."""
    cube = "SHELL TYPE public.capy_cube"
    parser, template = "TEXT SEARCH PARSER public.capy_parser", "TEXT SEARCH TEMPLATE public.capy_template"
    return {
        "EVENT TRIGGER capy_ddl": "event triggers need superuser, which a managed database does not grant",
        "SUBSCRIPTION capy_sub": "subscriptions need superuser; recreate them after the import if needed",
        "FOREIGN DATA WRAPPER capy_fdw": "foreign data wrappers need superuser",
        "PROCEDURAL LANGUAGE capy_pl": "the untrusted language capy_pl needs superuser",
        "SERVER capy_srv": _depends("FOREIGN DATA WRAPPER capy_fdw", "foreign data wrappers need superuser"),
        "FUNCTION public.capy_pl_handler()": C_LANGUAGE,
        "FUNCTION public.capy_from_sql(internal)": C_LANGUAGE,
        "FUNCTION public.capy_to_sql(internal)": C_LANGUAGE,
        "TRANSFORM TRANSFORM FOR integer LANGUAGE plpgsql": _depends(
            "FUNCTION public.capy_from_sql(internal)", "permission denied for language c"
        ),
        cube: f"a managed database cannot hold it as the project's role ({BASE_TYPE})",
        "FUNCTION public.capy_cube_in(cstring)": _depends(cube, BASE_TYPE),
        "FUNCTION public.capy_cube_out(public.capy_cube)": _depends(cube, BASE_TYPE),
        "TYPE public.capy_cube": _depends(cube, BASE_TYPE),
        "CAST CAST (text AS public.capy_cube)": _depends(cube, BASE_TYPE),
        "FUNCTION public.capy_cube_eq(public.capy_cube, public.capy_cube)": _depends(cube, BASE_TYPE),
        "FUNCTION public.capy_cube_cmp(public.capy_cube, public.capy_cube)": _depends(cube, BASE_TYPE),
        "OPERATOR public.=": _depends(cube, BASE_TYPE),
        "OPERATOR FAMILY public.capy_cube_ops": _depends(cube, BASE_TYPE),
        "OPERATOR CLASS public.capy_cube_ops": _depends(cube, BASE_TYPE),
        parser: "a managed database cannot hold it as the project's role (must be superuser to create text search parsers)",
        "TEXT SEARCH CONFIGURATION public.capy_cfg": _depends(
            parser, "must be superuser to create text search parsers"
        ),
        template: "a managed database cannot hold it as the project's role (must be superuser to create text search templates)",
        "TEXT SEARCH DICTIONARY public.capy_dict": _depends(
            template, "must be superuser to create text search templates"
        ),
        "PUBLICATION capy_pub_all": (
            "a managed database cannot hold it as the project's role (must be superuser to create FOR ALL TABLES publication)"
        ),
        "PUBLICATION TABLES IN SCHEMA public.capy_pub_schema public": (
            "a managed database cannot hold it as the project's role (must be superuser to add or set schemas)"
        ),
        "POLICY public.notes notes_read": (
            f'a managed database cannot hold it as the project\'s role (role "{outsider}" does not exist)'
        ),
    }


def build_and_dump(sql: str, tmp_path: Path, fmt: str = "custom", *, outsider: str | None = None) -> Path:
    """Build a source as the superuser, dump it, then drop the source (and `outsider`,
    the role the project's cluster must not have)."""
    name = pg.create_db(pg.scratch_name("capysrc_rehearse"))
    try:
        if outsider:
            pg.admin(f'CREATE ROLE "{outsider}" NOLOGIN')
        pg.psql(name, text=(f"\\set outsider {outsider}\n" if outsider else "") + sql)
        return pg.make_dump(name, fmt, tmp_path / f"source.{fmt}")
    finally:
        _drop_source(name)
        if outsider:
            pg.admin(f'DROP ROLE IF EXISTS "{outsider}"')


def _drop_source(name: str) -> None:
    # A subscription without a slot does not keep its database from being dropped.
    subs = pg.admin(
        "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = %s",
        (name,),
    )
    for (sub,) in subs:
        pg.psql(
            name,
            text=f"ALTER SUBSCRIPTION {sub} DISABLE; ALTER SUBSCRIPTION {sub} SET (slot_name = NONE); DROP SUBSCRIPTION {sub};",
        )
    pg.drop_db(name)


@pytest.fixture
def outsider() -> Iterator[str]:
    name = f"capy_tst_authenticated_{secrets.token_hex(3)}"
    yield name
    pg.admin(f'DROP ROLE IF EXISTS "{name}"')


def test_every_superuser_only_kind_is_skipped_and_listed(control_db, store, tmp_path, outsider):
    """The fixture database imports with exactly its superuser-only objects skipped."""
    dump = build_and_dump(MANAGED_KINDS.read_text(), tmp_path, outsider=outsider)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    report = job.facts.report
    assert {item["object"]: item["reason"] for item in report["skipped"]} == expected_skips(outsider)
    live = world.project.database_name
    assert pg.row_counts(live) == {"public.notes": 3}
    assert pg.admin("SELECT polname FROM pg_policy ORDER BY 1", dbname=live) == [("notes_own",)]
    assert pg.admin("SELECT pubname FROM pg_publication ORDER BY 1", dbname=live) == [
        ("capy_pub_notes",),
        ("capy_pub_schema",),
    ]
    rehearsal = next(c for c in job.facts.preflight["checks"] if c["name"] == SCHEMA_REHEARSAL)
    assert rehearsal["status"] == "warn"
    assert "POLICY public.notes notes_read" in rehearsal["detail"]


SUPABASE_STYLE = """
CREATE TABLE public.profiles (id int PRIMARY KEY, name text);
INSERT INTO public.profiles SELECT g, 'user ' || g FROM generate_series(1, 50) g;
ALTER TABLE public.profiles ENABLE ROW LEVEL SECURITY;
CREATE POLICY "profiles are readable" ON public.profiles FOR SELECT TO :"outsider" USING (true);
SET client_min_messages = error;
CREATE PUBLICATION supabase_realtime FOR ALL TABLES;
CREATE PUBLICATION capy_schema_pub FOR TABLES IN SCHEMA public;
"""


@pytest.mark.parametrize("fmt", ["custom", "tar", "plain"])
def test_policies_for_missing_roles_and_all_tables_publications_are_skipped(
    control_db, store, tmp_path, outsider, fmt
):
    """Supabase-style dumps: a policy TO a role the project cannot have and publications
    for all tables or a schema used to fail the restore after preflight said yes."""
    dump = build_and_dump(SUPABASE_STYLE, tmp_path, fmt, outsider=outsider)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    skipped = {item["object"] for item in job.facts.report["skipped"]}
    assert skipped == {
        "POLICY public.profiles profiles are readable",
        "PUBLICATION supabase_realtime",
        "PUBLICATION TABLES IN SCHEMA public.capy_schema_pub public",
    }
    assert pg.row_counts(world.project.database_name) == {"public.profiles": 50}


def test_the_api_preflight_lists_what_the_import_will_skip(control_db, store, tmp_path, outsider):
    dump = build_and_dump(SUPABASE_STYLE, tmp_path, outsider=outsider)
    world = make_world(control_db)
    upload = create_upload(store, world)
    upload_file(upload, dump)
    before = _rehearsal_leftovers()
    result = run_preflight(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=False, upload_key=upload["object_key"]),
        control_db,
        Sealer(control_db.secret_key),
        store,
    )
    checks = {check.name: check for check in result.report.checks}
    assert [check.name for check in result.report.checks] == list(UPLOAD_CHECKS)
    assert result.report.ok
    assert checks[SCHEMA_REHEARSAL].status == "warn"
    assert checks[SCHEMA_REHEARSAL].detail.startswith(
        "the schema restored as the project's role into a throw-away database, except 3 object(s) a managed "
        "database cannot hold, which the import leaves out (listed in its report as skipped): "
    )
    assert (
        f'POLICY public.profiles profiles are readable (a managed database cannot hold it as the project\'s role (role "{outsider}" does not exist))'
        in checks[SCHEMA_REHEARSAL].detail
    )
    # The throw-away database and its role are gone (another run's may come and go meanwhile).
    deadline = time.monotonic() + 20
    while (left := _rehearsal_leftovers() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == set()


def _rehearsal_leftovers() -> set[str]:
    return {
        name
        for (name,) in pg.admin(
            "SELECT datname FROM pg_database WHERE left(datname, 15) = 'capy_rehearsal_' "
            "UNION ALL SELECT rolname FROM pg_roles WHERE left(rolname, 15) = 'capy_rehearsal_'"
        )
    }


CHECK_READS_ANOTHER_TABLE = """
CREATE TABLE public.zone_codes (code text PRIMARY KEY);
CREATE FUNCTION public.known_zone(text) RETURNS boolean LANGUAGE sql
    AS $$ SELECT EXISTS (SELECT 1 FROM zone_codes WHERE code = $1) $$;
CREATE TABLE public.deliveries (id int PRIMARY KEY, zone text CHECK (public.known_zone(zone)));
INSERT INTO public.zone_codes VALUES ('north'), ('south');
INSERT INTO public.deliveries VALUES (1, 'north'), (2, 'south');
"""


@pytest.mark.parametrize("how", ["live", "custom"])
def test_a_check_calling_a_function_that_reads_another_table_is_refused_before_anything_changes(
    control_db, store, tmp_path, how
):
    """Such a CHECK fails at data load (the other table is not loaded yet, search_path is
    empty): preflight refuses, naming the constraint and the change to make."""
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep_me (id int); INSERT INTO keep_me VALUES (7);")
    if how == "live":
        name = pg.create_db(pg.scratch_name("capysrc_checkfn"))
        try:
            pg.psql(name, text=CHECK_READS_ANOTHER_TABLE)
            job = run_import(control_db, world, pg.url_for(name, sslmode="disable"), recreate=True)
        finally:
            pg.drop_db(name)
    else:
        job = upload_and_import(
            control_db, store, world, build_and_dump(CHECK_READS_ANOTHER_TABLE, tmp_path), recreate=True
        )
    assert job.state == "failed"
    assert job.stage == "preflight", (job.stage, job.error)
    assert job.error.startswith(
        "preflight check schema_rehearsal failed: the schema does not restore as the project's role (1 problem(s)): "
    )
    assert (
        "CHECK constraint deliveries_zone_check of table public.deliveries calls public.known_zone(), which reads "
        "another table (public.zone_codes)" in job.error
    )
    assert "re-add it as NOT VALID" in job.error
    assert pg.row_counts(live) == {"public.keep_me": 1}


CHECK_READS_ANOTHER_TABLE_INDIRECTLY = """
CREATE TABLE public.z_cust (id int PRIMARY KEY);
CREATE FUNCTION public.inner_ok(int) RETURNS boolean LANGUAGE sql
    AS $$ SELECT EXISTS (SELECT 1 FROM ONLY public.z_cust WHERE id = $1) $$;
CREATE FUNCTION public.cust_ok(int) RETURNS boolean LANGUAGE sql AS $$ SELECT public.inner_ok($1) $$;
CREATE TABLE public.a_orders (id int PRIMARY KEY, cust int CHECK (public.cust_ok(cust)));
INSERT INTO public.z_cust VALUES (1), (2);
INSERT INTO public.a_orders VALUES (1, 1), (2, 2);
"""


def test_a_check_reading_another_table_through_another_function_is_refused(control_db, store, tmp_path):
    world = make_world(control_db)
    job = upload_and_import(
        control_db, store, world, build_and_dump(CHECK_READS_ANOTHER_TABLE_INDIRECTLY, tmp_path)
    )
    assert job.state == "failed"
    assert job.stage == "preflight", (job.stage, job.error)
    assert (
        "CHECK constraint a_orders_cust_check of table public.a_orders calls public.cust_ok(), which reads "
        "another table (public.z_cust)" in job.error
    ), job.error


CHECK_OF_A_DOMAIN_READS_ANOTHER_TABLE = """
CREATE TABLE public.z_ref (id int PRIMARY KEY);
CREATE FUNCTION public.ok(int) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN RETURN EXISTS (WITH c AS (TABLE public.z_ref) SELECT 1 FROM c WHERE c.id = $1); END $$;
CREATE DOMAIN public.d_ok AS int CHECK (public.ok(VALUE));
CREATE TABLE public.a_uses (id int PRIMARY KEY, ref public.d_ok);
INSERT INTO public.z_ref VALUES (1), (2);
INSERT INTO public.a_uses VALUES (1, 1), (2, 2);
"""


def test_a_domain_check_reading_another_table_is_refused(control_db, store, tmp_path):
    world = make_world(control_db)
    job = upload_and_import(
        control_db, store, world, build_and_dump(CHECK_OF_A_DOMAIN_READS_ANOTHER_TABLE, tmp_path)
    )
    assert (job.state, job.stage) == ("failed", "preflight"), (job.stage, job.error)
    assert (
        "CHECK constraint d_ok_check of domain public.d_ok calls public.ok(), which reads another table "
        "(public.z_ref)" in job.error
    ), job.error
    assert "trigger on the tables whose columns use the domain" in job.error


C_TYPE_IN_A_TABLE = """
CREATE TYPE public.capy_cube;
CREATE FUNCTION public.capy_cube_in(cstring) RETURNS public.capy_cube
    AS '$libdir/cube', 'cube_in' LANGUAGE C IMMUTABLE STRICT;
CREATE FUNCTION public.capy_cube_out(public.capy_cube) RETURNS cstring
    AS '$libdir/cube', 'cube_out' LANGUAGE C IMMUTABLE STRICT;
CREATE TYPE public.capy_cube (INTERNALLENGTH = variable, INPUT = public.capy_cube_in, OUTPUT = public.capy_cube_out);
CREATE TABLE public.shapes (id int PRIMARY KEY, box public.capy_cube);
INSERT INTO public.shapes VALUES (1, '(1,2)');
CREATE FUNCTION public.capy_from_sql(internal) RETURNS internal AS '$libdir/cube', 'cube_in' LANGUAGE C IMMUTABLE;
CREATE FUNCTION public.capy_to_sql(internal) RETURNS integer AS '$libdir/cube', 'cube_in' LANGUAGE C IMMUTABLE;
CREATE TRANSFORM FOR integer LANGUAGE plpgsql (
    FROM SQL WITH FUNCTION public.capy_from_sql(internal), TO SQL WITH FUNCTION public.capy_to_sql(internal)
);
CREATE TABLE public.plain_rows (id int PRIMARY KEY);
INSERT INTO public.plain_rows VALUES (1);
"""


def test_regression_suite_style_objects_are_all_listed_before_the_dump_is_fetched(
    control_db, store, tmp_path
):
    """A table whose column type needs superuser is refused at preflight with every
    problem listed (not the first restore error after the whole dump was fetched)."""
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, build_and_dump(C_TYPE_IN_A_TABLE, tmp_path))
    assert job.state == "failed"
    assert job.stage == "preflight", (job.stage, job.error)
    assert "dump_path" not in job.facts.stored()
    assert (
        "SHELL TYPE public.capy_cube: must be superuser to create a base type; needed by TABLE public.shapes, "
        "CONSTRAINT public.shapes shapes_pkey. A managed database cannot hold it as the project's role: change "
        "those to not use it (another type or function), or drop it from the source, and import again"
    ) in job.error
    # The transform nothing needs is listed too, as what the import would leave out.
    assert "Besides, the import would leave out: " in job.error
    assert "TRANSFORM TRANSFORM FOR integer LANGUAGE plpgsql" in job.error


def test_a_plain_dump_whose_check_reads_another_table_is_refused(control_db, store, tmp_path):
    world = make_world(control_db)
    job = upload_and_import(
        control_db, store, world, build_and_dump(CHECK_READS_ANOTHER_TABLE, tmp_path, "plain")
    )
    assert job.state == "failed"
    assert job.stage == "preflight", (job.stage, job.error)
    assert (
        "CHECK constraint deliveries_zone_check of table public.deliveries calls public.known_zone()"
        in job.error
    )


CHECK_READS_NOTHING_ELSE = """
CREATE TABLE public.status (code text PRIMARY KEY);
CREATE FUNCTION public.valid_code(code text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE status boolean;
BEGIN
    status := code ~ '^[a-z]+$';
    RETURN status;
END $$;
CREATE TABLE public.items (id int PRIMARY KEY, code text CHECK (public.valid_code(code)));
INSERT INTO public.status VALUES ('open');
INSERT INTO public.items VALUES (1, 'abc'), (2, 'def');
"""


def test_a_check_whose_function_reads_no_other_table_imports(control_db, store, tmp_path):
    """A word in the body that happens to be a table's name is not a read of it."""
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, build_and_dump(CHECK_READS_NOTHING_ELSE, tmp_path))
    assert job.state == "completed", (job.error, job.last_stderr)
    assert pg.row_counts(world.project.database_name) == {"public.items": 2, "public.status": 1}
    rehearsal = next(c for c in job.facts.preflight["checks"] if c["name"] == SCHEMA_REHEARSAL)
    assert rehearsal["status"] == "pass"


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_policy_for_another_tenants_role_is_skipped_never_imported(control_db, store, tmp_path, fmt):
    """Any role of the cluster can be named in a policy: another project's role would be
    tied to this project's database (it could not be dropped) and its name confirmed."""
    victim = make_world(control_db)
    role = victim.project.role_name
    world = make_world(control_db)
    source = "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 5);\n"
    source += f'ALTER TABLE t ENABLE ROW LEVEL SECURITY; CREATE POLICY other_tenant ON t TO "{role}" USING (true);\n'
    source += "CREATE POLICY everyone ON t USING (true);\n"
    job = upload_and_import(control_db, store, world, build_and_dump(source, tmp_path, fmt))
    assert job.state == "completed", (job.error, job.last_stderr)
    skipped = {item["object"]: item["reason"] for item in job.facts.report["skipped"]}
    assert skipped == {
        "POLICY public.t other_tenant": (
            f"it is for role(s) {role}, which a project cannot have: a project's policies are for PUBLIC or "
            "roles the project creates; recreate it for the project's roles after the import"
        )
    }
    live = world.project.database_name
    assert pg.admin("SELECT polname FROM pg_policy", dbname=live) == [("everyone",)]
    assert pg.row_counts(live) == {"public.t": 5}


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_text_that_looks_like_pg_dumps_headers_inside_a_string_is_not_a_header(
    control_db, store, tmp_path, fmt
):
    source = (
        "CREATE TABLE notes (id int PRIMARY KEY); INSERT INTO notes VALUES (1);\n"
        "COMMENT ON TABLE notes IS E'docs:\\n--\\n-- Name: fake; Type: TABLE; Schema: public; Owner: postgres\\n--\\n"
        "\\n--\\n-- TOC entry 9999 (class 1259 OID 1)\\n-- Dependencies: none\\n--\\nend';\n"
    )
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, build_and_dump(source, tmp_path, fmt))
    assert job.state == "completed", (job.error, job.last_stderr)
    rehearsal = next(c for c in job.facts.preflight["checks"] if c["name"] == SCHEMA_REHEARSAL)
    assert rehearsal["status"] == "pass", rehearsal
    comment = pg.admin("SELECT obj_description('public.notes'::regclass)", dbname=world.project.database_name)
    assert comment[0][0].startswith("docs:\n--\n-- Name: fake;") and comment[0][0].endswith("--\nend")
