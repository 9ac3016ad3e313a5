"""Extensions' configuration tables (`pg_extension_config_dump`: PostGIS's
`spatial_ref_sys`, pg_partman's `part_config`): pg_dump dumps their rows as the user's
data. They arrive in the imported database, live and uploaded, and the project's role
can edit them afterwards. Both imports failed before with `permission denied for table
settings`: the admin that creates the extension owns them."""

from __future__ import annotations

import pytest

from pipeline.import_steps import restore_role_name
from pipeline.models import Project
from stages.copy.archive import plan_archive
from stages.dumps import toc
from stages.dumps.archivetoc import read_toc
from stages.tools.commands import PgTools
from tests.support import extensions, pg
from tests.support.copying import PG_BIN
from tests.support.imports import import_database, upload_and_import
from tests.support.world import make_world

SOURCE_SQL = """
CREATE SCHEMA capy_config;
CREATE EXTENSION capy_config_test SCHEMA capy_config;
INSERT INTO capy_config.settings (name, value) VALUES ('tenant_a', 'x'), ('tenant_b', 'y');
DELETE FROM capy_config.settings WHERE name = 'tenant_a';
INSERT INTO capy_config.settings (name, value) VALUES ('tenant_c', 'z');
INSERT INTO capy_config_jobs.schedule (name, every) VALUES ('vacuum', '1 day'), ('report', '7 days');
CREATE TABLE public.notes (id int PRIMARY KEY, kept text DEFAULT capy_config.setting('retention'));
INSERT INTO public.notes (id) VALUES (1), (2);
"""


@pytest.fixture(scope="module")
def settings(control_db):
    extensions.install()
    return control_db.replace(extension_allowlist=(*control_db.extension_allowlist, extensions.NAME))


@pytest.fixture
def source(scratch_db):
    name = scratch_db("capysrc")
    pg.psql(name, text=SOURCE_SQL)
    return name


def _configuration(dbname: str) -> tuple[list[tuple], ...]:
    return (
        pg.admin("SELECT id, name, value, builtin FROM capy_config.settings ORDER BY id", dbname=dbname),
        pg.admin("SELECT name, every::text FROM capy_config_jobs.schedule ORDER BY name", dbname=dbname),
        pg.admin("SELECT last_value, is_called FROM capy_config.settings_id_seq", dbname=dbname),
    )


@pytest.mark.parametrize("way", ["live", "custom", "tar", "plain"])
def test_an_extensions_configuration_arrives_and_the_project_can_edit_it(
    settings, store, source, tmp_path, way
):
    world = make_world(settings)
    job = import_database(settings, store, world, source, way, tmp_path)
    assert job.state == "completed", job.error
    live = world.project.database_name
    # The extension's own rows once (not doubled by the dump's), the user's with their
    # ids, the sequence where the source left it.
    assert _configuration(live) == _configuration(source)
    assert [name for _, name, _, _ in _configuration(live)[0]] == [
        "retention",
        "batch",
        "tenant_b",
        "tenant_c",
    ]
    assert pg.schema_dump(live) == pg.schema_dump(source), pg.schema_difference(source, live)
    assert pg.row_counts(live) == pg.row_counts(source)
    # The project's role may change its extension's configuration, as on a server
    # where it had created the extension itself; the restore role is gone.
    role = Project.get_by_id(world.project.id).role_name
    assert pg.admin(
        "SELECT has_table_privilege(%(r)s, 'capy_config.settings', 'SELECT, INSERT, UPDATE, DELETE'), "
        "has_sequence_privilege(%(r)s, 'capy_config.settings_id_seq', 'USAGE, UPDATE'), "
        "has_schema_privilege(%(r)s, 'capy_config_jobs', 'USAGE'), "
        "has_table_privilege(%(r)s, 'capy_config_jobs.schedule', 'INSERT') "
        "AND has_sequence_privilege(%(r)s, 'capy_config_jobs.schedule_id_seq', 'USAGE')",
        {"r": role},
        dbname=live,
    ) == [(True, True, True, True)]
    assert pg.admin("SELECT 1 FROM pg_roles WHERE rolname = %s", (restore_role_name(job),)) == []
    # Counted as pg_dump dumps them: the user's rows, not the extension's own.
    assert job.facts.report["tables"]["capy_config.settings"] == {"source_rows": 2, "target_rows": 2}
    assert job.facts.report["tables"]["capy_config_jobs.schedule"] == {"source_rows": 2, "target_rows": 2}


def test_a_dump_that_empties_an_extensions_configuration_fails_verification(
    settings, store, source, tmp_path
):
    """A configuration table's rows beyond those its CREATE EXTENSION made must be the
    dump's: one that lost them fails verification, naming it."""
    world = make_world(settings)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1);")
    dump = pg.make_dump(source, "plain", tmp_path / "source.sql")
    text = dump.read_text()
    end = text.rindex("--\n-- PostgreSQL database dump complete")
    dump.write_text(text[:end] + "DELETE FROM capy_config.settings;\n\n" + text[end:])
    job = upload_and_import(settings, store, world, dump, recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    made = "table capy_config.settings has 0 rows, not 4: the 2 its extension made and the source's 2"
    assert made in job.error, job.error
    assert pg.row_counts(live) == {"public.keep": 1}


def test_a_foreign_key_to_a_configuration_table_is_created_after_its_rows(settings, scratch_db, tmp_path):
    """An uploaded archive's foreign key that references an extension's configuration
    table depends on the extension, not on a copied table: it is left to pg_restore
    after the data section, never built beside the copy as if it referenced its own
    table (it failed, now and then, before the configuration rows were in)."""
    source = scratch_db("capysrc")
    pg.psql(
        source,
        text=SOURCE_SQL
        + "CREATE TABLE public.uses (id int PRIMARY KEY, setting text REFERENCES capy_config.settings (name), "
        + "up int REFERENCES public.uses (id));",
    )
    archive = str(pg.make_dump(source, "custom", tmp_path / "source.dump"))
    kept = toc.plan(toc.read(PgTools(PG_BIN), archive), precreated_schemas=set()).keep
    plan = plan_archive(
        read_toc(archive), kept, encoding="UTF8", plain_tables={("public", "notes"), ("public", "uses")}
    )
    by_name = {entry.name: entry.dump_id for entry in kept}
    assert by_name["uses uses_setting_fkey"] not in plan.owned
    assert plan.owned[by_name["uses uses_up_fkey"]].kind == "foreign key"  # its own table's: built beside
