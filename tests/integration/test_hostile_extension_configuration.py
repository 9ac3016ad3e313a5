"""Hostile review of extensions' configuration tables (commit e249234): the admin grants
the restore role, then the project role, read and write on the tables an extension marks
with `pg_extension_config_dump`, and verification checks they hold "at least the dump's
rows".

Each test asserts the correct behaviour: a failing test is a problem found. The ones
that pass are attacks that held (kept so that they go on holding)."""

from __future__ import annotations

import psycopg2
import pytest
from psycopg2 import sql

import pipeline.steps.finalize as finalize_stage
from pipeline.import_steps import restore_role_name
from pipeline.models import Project
from stages.database.cluster import ClusterAdmin
from tests.support import extensions, pg
from tests.support.imports import import_in_new_project, upload_and_import
from tests.support.world import make_world

BASE_SQL = extensions.SOURCE_SQL

# A daily-partitioned table managed by pg_partman, its settings changed by the user.
PARTMAN_SQL = """
CREATE SCHEMA partman;
CREATE EXTENSION pg_partman SCHEMA partman;
CREATE TABLE public.events (id bigint NOT NULL, at timestamptz NOT NULL, body text) PARTITION BY RANGE (at);
SELECT partman.create_parent('public.events', 'at', 'native', 'daily',
    p_start_partition := to_char(now() - interval '2 days', 'YYYY-MM-DD'));
INSERT INTO public.events VALUES (1, now(), 'a');
UPDATE partman.part_config SET retention = '30 days', premake = 2 WHERE parent_table = 'public.events';
"""


@pytest.fixture(scope="module")
def settings(control_db):
    extensions.install()
    return control_db.replace(
        extension_allowlist=(*control_db.extension_allowlist, extensions.NAME, "pg_partman")
    )


def _source(scratch_db, text: str) -> str:
    name = scratch_db("capysrc")
    pg.psql(name, text=text)
    return name


def _user_settings(dbname: str, schema: str = "capy_config") -> list[tuple]:
    return pg.admin(
        sql.SQL("SELECT name, value FROM {}.settings WHERE NOT builtin ORDER BY id").format(
            sql.Identifier(schema)
        ),
        dbname=dbname,
    )


# -- problems ---------------------------------------------------------------------------


@pytest.mark.parametrize("way", ["live", "custom", "plain"])
def test_configuration_rows_lost_before_verification_fail_the_import(
    settings, store, scratch_db, tmp_path, monkeypatch, way
):
    """Attacks the "at least the dump's rows" check. Every user row of a configuration
    table vanishes from the preview between the restore and the verification (simulated
    by deleting them as the admin just before finalize). An upload's check compares the
    dump's 2 rows with the table's total, which counts the extension's own 2 built-in
    rows as the user's, so 2 >= 2 passes (PostGIS's spatial_ref_sys has ~8,500 built-in
    rows: no loss of user SRIDs could ever be seen). A live import does not count the
    configuration tables at all (they are not in its source counts). The import must
    fail and leave the project's database untouched."""
    source = _source(scratch_db, BASE_SQL)
    original = finalize_stage.run

    def losing(steps, context):
        pg.admin(
            "DELETE FROM capy_config.settings WHERE NOT builtin", dbname=context.job.facts.preview_database
        )
        return original(steps, context)

    monkeypatch.setattr(finalize_stage, "run", losing)
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "failed", (
        f"completed, though the project's database now holds {_user_settings(world.project.database_name)} "
        f"of the source's {_user_settings(source)}"
    )
    assert "capy_config.settings" in (job.error or "")


def test_a_plain_dump_that_deletes_its_configuration_rows_fails_verification(
    settings, store, scratch_db, tmp_path
):
    """The existing test shows a dump that empties a configuration table is caught. A
    dump that deletes only the user's rows (`WHERE NOT builtin`) leaves the extension's
    built-in rows, as many as the dump's, and passes: the same loss, not named."""
    source = _source(scratch_db, BASE_SQL)
    world = make_world(settings)
    dump = pg.make_dump(source, "plain", tmp_path / "source.sql")
    text = dump.read_text()
    end = text.rindex("--\n-- PostgreSQL database dump complete")
    dump.write_text(text[:end] + "DELETE FROM capy_config.settings WHERE NOT builtin;\n\n" + text[end:])
    job = upload_and_import(settings, store, world, dump)
    assert job.state == "failed", (
        f"completed with {_user_settings(world.project.database_name)} of the dump's {_user_settings(source)}"
    )
    assert "capy_config.settings" in job.error


@pytest.mark.parametrize("way", ["live", "custom", "plain"])
def test_a_foreign_key_to_a_configuration_table_restores(settings, store, scratch_db, tmp_path, way):
    """A user table whose foreign key references an extension's configuration table
    (`srid REFERENCES spatial_ref_sys`, a row of part_config…) is legitimate where the
    user created the extension. The grant leaves out REFERENCES, so every way of
    importing fails with 'permission denied for table settings'."""
    source = _source(
        scratch_db,
        BASE_SQL
        + "CREATE TABLE public.uses (id int PRIMARY KEY, setting text REFERENCES capy_config.settings (name));"
        + "INSERT INTO public.uses VALUES (1, 'tenant_a');",
    )
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "completed", job.error
    assert pg.row_counts(world.project.database_name)["public.uses"] == 1


# -- attacks that held -------------------------------------------------------------------


@pytest.fixture
def granted(scratch_db):
    """A preview made as the service makes one: a database owned by a restore role, the
    extension created by the admin with its configuration granted to that role."""
    admin = ClusterAdmin(pg.ADMIN_URL)
    role = "capy_t_role_hx_" + pg.scratch_name("r").rsplit("_", 1)[-1]
    other = role + "_prj"
    database = pg.scratch_name("capy_t_db")
    admin.ensure_restore_role(role)
    pg.admin(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(other)))
    admin.create_database(database, owner=role)
    admin.create_extensions(database, role, {extensions.NAME: "capy_config"})
    try:
        yield admin, database, role, other
    finally:
        pg.drop_db(database)
        for name in (role, other):
            pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


HOSTILE = [
    "CREATE TRIGGER t BEFORE INSERT ON capy_config.settings FOR EACH ROW EXECUTE FUNCTION capy_config.evil()",
    "CREATE RULE r AS ON INSERT TO capy_config.settings DO ALSO SELECT capy_config.evil_v()",
    "ALTER TABLE capy_config.settings ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY p ON capy_config.settings USING (capy_config.evil_v() IS NULL)",
    "ALTER TABLE capy_config.settings ADD CONSTRAINT c CHECK (capy_config.evil_v() IS NULL)",
    "ALTER TABLE capy_config.settings ALTER COLUMN value SET DEFAULT capy_config.evil_v()::text",
    "CREATE INDEX ON capy_config.settings ((capy_config.evil_v()))",
    "CREATE TABLE capy_config.child () INHERITS (capy_config.settings)",
    "ALTER TABLE capy_config.settings OWNER TO CURRENT_USER",
    "TRUNCATE capy_config.settings",
    "CREATE TABLE capy_config_jobs.planted (id int)",
    "CREATE FUNCTION capy_config_jobs.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TRIGGER t BEFORE INSERT ON capy_config_jobs.schedule FOR EACH ROW EXECUTE FUNCTION capy_config.evil()",
    "ALTER SEQUENCE capy_config.settings_id_seq OWNED BY NONE",
    "ALTER EXTENSION capy_config_test DROP TABLE capy_config.settings",
    "ALTER EXTENSION capy_config_test UPDATE",
    "DROP TABLE capy_config_jobs.schedule",
]


def _refused(database: str, role: str, allowed: list[str]) -> list[str]:
    """Run `allowed` (each must work), then every HOSTILE statement, as `role`; return
    the hostile statements that did not fail."""
    conn = psycopg2.connect(pg.url_for(database).replace("postgres@", f"{role}@"))
    conn.autocommit = True
    accepted = []
    try:
        with conn.cursor() as cur:
            for statement in allowed:
                cur.execute(statement)
            for statement in HOSTILE:
                try:
                    cur.execute(statement)
                except psycopg2.Error:
                    continue
                accepted.append(statement)
    finally:
        conn.close()
    return accepted


def test_the_granted_roles_cannot_attach_code_to_configuration_tables(granted):
    """The grants let the restore role (and after the hand-over the project role) read
    and write configuration tables the superuser owns. Neither may attach code to them
    (triggers, rules, policies, checks, defaults, expression indexes, children), take
    them over, or plant objects in the schema the extension made: anything an admin's
    or another session's write could run."""
    admin, database, role, other = granted
    assert (
        _refused(
            database,
            role,
            [
                "CREATE FUNCTION capy_config.evil() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
                "CREATE FUNCTION capy_config.evil_v() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT NULL::int'",
                # What the grant is for still works.
                "INSERT INTO capy_config.settings (name, value) VALUES ('mine', 'x')",
                "GRANT SELECT ON capy_config.settings TO PUBLIC",  # a warning, granting nothing
            ],
        )
        == []
    )
    admin.hand_over(database, from_role=role, to_role=other)
    assert pg.admin("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)) == []
    assert (
        _refused(
            database,
            other,
            [
                "INSERT INTO capy_config.settings (name, value) VALUES ('theirs', 'y')",
                "UPDATE capy_config_jobs.schedule SET every = '2 days'",
            ],
        )
        == []
    )
    acl = pg.admin(
        "SELECT relacl::text FROM pg_class WHERE oid = 'capy_config.settings'::regclass", dbname=database
    )
    assert acl == [(f"{{postgres=arwdDxt/postgres,{other}=arwdx/postgres}}",)]


@pytest.mark.parametrize("way", ["live", "custom", "tar", "plain"])
def test_pg_partman_configuration_arrives(settings, store, scratch_db, tmp_path, way):
    """A real extension: pg_partman's part_config (CHECK constraints calling SECURITY
    DEFINER functions, a deferrable FK from part_config_sub) arrives with the user's
    settings, beside a second extension with configuration tables."""
    source = _source(scratch_db, BASE_SQL + PARTMAN_SQL)
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "completed", job.error
    live = world.project.database_name
    assert pg.admin("SELECT parent_table, retention, premake FROM partman.part_config", dbname=live) == [
        ("public.events", "30 days", 2)
    ]
    assert _user_settings(live) == _user_settings(source)
    role = Project.get_by_id(world.project.id).role_name
    assert pg.admin(
        "SELECT has_table_privilege(%s, 'partman.part_config', 'UPDATE')", (role,), dbname=live
    ) == [(True,)]


@pytest.mark.parametrize("schema", ["public", "Odd.Sch ema"])
@pytest.mark.parametrize("way", ["live", "custom", "plain"])
def test_an_extension_in_public_or_an_odd_schema(settings, store, scratch_db, tmp_path, way, schema):
    """The extension in `public` (a schema the service does not create) or in a schema
    whose name needs quoting and holds a dot."""
    quoted = '"' + schema + '"' if schema != "public" else "public"
    source = _source(
        scratch_db,
        BASE_SQL.replace("CREATE SCHEMA capy_config;", f"CREATE SCHEMA IF NOT EXISTS {quoted};")
        .replace("capy_config.", f"{quoted}.")
        .replace("SCHEMA capy_config", f"SCHEMA {quoted}"),
    )
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "completed", job.error
    assert _user_settings(world.project.database_name, schema) == [("tenant_a", "x"), ("tenant_b", "y")]


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_dump_of_an_imported_project_imports_again(settings, store, scratch_db, tmp_path, fmt):
    """A project's database dumped again carries the hand-over's GRANTs to its project
    role (`GRANT … ON TABLE capy_config.settings TO capy_prj_…`); imported into another
    project it still completes, granting nothing to the first project's role."""
    source = _source(scratch_db, BASE_SQL)
    first, job = import_in_new_project(settings, store, source, "custom", tmp_path)
    assert job.state == "completed", job.error
    dump = pg.dump_with(first.project.database_name, tmp_path / "again", f"--format={fmt}")
    second = make_world(settings)
    job = upload_and_import(settings, store, second, dump)
    assert job.state == "completed", job.error
    first_role = Project.get_by_id(first.project.id).role_name
    assert pg.admin(
        "SELECT has_table_privilege(%s, 'capy_config.settings', 'SELECT')",
        (first_role,),
        dbname=second.project.database_name,
    ) == [(False,)]


@pytest.mark.parametrize("way", ["live", "custom", "plain"])
def test_a_user_row_colliding_with_a_built_in_one_fails_loudly(settings, store, scratch_db, tmp_path, way):
    """A user who replaced a built-in row (deleted it and inserted their own of the same
    name) has a dump whose COPY collides with the row the target's CREATE EXTENSION
    inserts: the import fails naming the table and the key (never a silent partial
    table), and the restore role is gone."""
    source = _source(
        scratch_db,
        BASE_SQL
        + "DELETE FROM capy_config.settings WHERE name = 'batch';"
        + "INSERT INTO capy_config.settings (name, value) VALUES ('batch', '500');",
    )
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "failed"
    assert "settings" in job.error and "batch" in job.error, job.error
    assert pg.admin("SELECT 1 FROM pg_roles WHERE rolname = %s", (restore_role_name(job),)) == []
    assert not pg.database_exists(job.facts.preview_database or "capy_none")
