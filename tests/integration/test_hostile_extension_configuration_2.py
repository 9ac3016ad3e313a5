"""Second hostile review of extensions' configuration tables (commits e249234, 0af7256):
configuration tables counted on both sides with their extension's condition, the live
source's counts taken in its snapshot, only marked extension sequences compared, and an
uploaded archive's foreign key that depends on anything but copied tables and their
keys left to pg_restore after the data section (stages/copy/archive.py `_owners`).

Each test asserts the correct behaviour: a failing test is a problem found. The ones
that pass are attacks that held (kept so that they go on holding)."""

from __future__ import annotations

import pytest
from psycopg2 import sql

from stages.copy import live as live_copy
from stages.copy.archive import plan_archive
from stages.dumps import toc
from stages.dumps.archivetoc import read_toc
from stages.tools.commands import PgTools
from tests.support import extensions, pg
from tests.support.copying import PG_BIN
from tests.support.imports import import_in_new_project, run_import, upload_and_import
from tests.support.world import make_world

BASE_SQL = extensions.SOURCE_SQL


# An extension in two versions, as PostGIS ships spatial_ref_sys: rows of its own, and a
# condition over ranges of keys it keeps for itself. Version 2.0 claims a wider range
# (as a newer PostGIS does for newer EPSG codes) without shipping a row at every key.
VERSIONED = "capy_hx2_versions"
VERSIONED_FILES = {
    f"{VERSIONED}.control": "comment = 'hostile review 2'\ndefault_version = '2.0'\nrelocatable = false\nsuperuser = true\n",
    f"{VERSIONED}--1.0.sql": (
        "CREATE TABLE @extschema@.codes (code int PRIMARY KEY, label text NOT NULL);\n"
        "INSERT INTO @extschema@.codes SELECT g, 'shipped ' || g FROM generate_series(1, 10) g;\n"
        "SELECT pg_catalog.pg_extension_config_dump('@extschema@.codes', 'WHERE NOT (code BETWEEN 1 AND 10)');\n"
    ),
    f"{VERSIONED}--2.0.sql": (
        "CREATE TABLE @extschema@.codes (code int PRIMARY KEY, label text NOT NULL);\n"
        "INSERT INTO @extschema@.codes SELECT g, 'shipped ' || g FROM generate_series(1, 10) g;\n"
        "INSERT INTO @extschema@.codes VALUES (500, 'shipped 500');\n"
        "SELECT pg_catalog.pg_extension_config_dump('@extschema@.codes', "
        "'WHERE NOT (code BETWEEN 1 AND 10 OR code BETWEEN 500 AND 600)');\n"
    ),
}


@pytest.fixture(scope="module")
def settings(control_db):
    extensions.install()
    written = []
    for name, text in VERSIONED_FILES.items():
        path = extensions.directory() / name
        path.write_text(text)
        written.append(path)
    yield control_db.replace(
        extension_allowlist=(
            *control_db.extension_allowlist,
            extensions.NAME,
            "pg_partman",
            "citext",
            VERSIONED,
        )
    )
    for path in written:
        path.unlink(missing_ok=True)


def _source(scratch_db, text: str) -> str:
    name = scratch_db("capysrc")
    pg.psql(name, text=text)
    return name


def _user_settings(dbname: str) -> list[tuple]:
    return pg.admin(
        "SELECT id, name, value FROM capy_config.settings WHERE NOT builtin ORDER BY id", dbname=dbname
    )


# -- problems ---------------------------------------------------------------------------


def test_a_foreign_key_on_an_extension_type_is_still_built_beside_the_copy(scratch_db, tmp_path):
    """Attacks `_owners`' new rule (a foreign key with any dependency that is not a
    copied table or its key is left to pg_restore after the data section). A foreign
    key between two ordinary tables on a `citext` column (an email, a code: common)
    depends on citext's equality operators, which the archive names by their extension.
    It references an ordinary copied table, as before the change, when it was built
    beside the copy once both tables were in; now it waits for the end of the whole
    copy, in pg_restore's post-data (slower, and unlike every other foreign key). The
    same for any column type whose operators an extension makes (ltree, isn, hstore…).
    Only a key into an extension's own table (whose key is named by the extension and
    no copied table's) has to wait."""
    source = _source(
        scratch_db,
        "CREATE EXTENSION citext;"
        "CREATE TABLE public.accounts (email citext PRIMARY KEY);"
        "CREATE TABLE public.logins (id int PRIMARY KEY, email citext REFERENCES public.accounts (email));"
        "INSERT INTO public.accounts VALUES ('A@x'); INSERT INTO public.logins VALUES (1, 'a@x');",
    )
    archive = str(pg.dump_with(source, tmp_path / "source.dump", "--format=custom"))
    contents = read_toc(archive)
    kept = toc.plan(toc.read(PgTools(PG_BIN), archive), precreated_schemas=set()).keep
    plan = plan_archive(
        contents, kept, encoding="UTF8", plain_tables={("public", "accounts"), ("public", "logins")}
    )
    by_name = {entry.name: entry.dump_id for entry in kept}
    tables = {e.tag: e.dump_id for e in contents.entries if e.desc == "TABLE"}
    owned = plan.owned.get(by_name["logins logins_email_fkey"])
    assert owned is not None, "the citext foreign key is left to pg_restore after the data section"
    assert (owned.table, owned.references) == (tables[b"logins"], tables[b"accounts"])


def test_a_source_condition_pg_dump_accepts_is_counted(settings, scratch_db):
    """Attacks the live count's text: `SELECT count(*) FROM ONLY t <condition>`, while
    pg_dump selects `COPY (SELECT cols FROM t <condition>) TO stdout`. A condition
    pg_dump accepts (here one ordering its rows, `WHERE NOT builtin ORDER BY id`, set as
    an extension's script would set it) is an error in the count ('column must appear in
    the GROUP BY clause'): the live import fails although pg_dump dumps the rows. A
    count over pg_dump's own select (`SELECT count(*) FROM (SELECT 1 FROM t <condition>)
    c`) counts what it dumps, whatever the clause holds. (And the error is not the
    user's: an 'internal error interrupted the restore stage', retried three times as
    transient.)"""
    source = _source(
        scratch_db,
        BASE_SQL
        + "UPDATE pg_extension SET extcondition = ARRAY['WHERE NOT builtin ORDER BY id', '', ''] "
        + "WHERE extname = 'capy_config_test';",
    )
    world = make_world(settings)
    job = run_import(settings, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", job.error
    assert _user_settings(world.project.database_name) == _user_settings(source)


@pytest.mark.parametrize("way", ["live", "custom"])
def test_an_older_extension_version_on_the_source_imports(settings, store, scratch_db, tmp_path, way):
    """Attacks counting each side with its own extension's condition. The target creates
    the extension's default version (2.0), the source has 1.0: a user's row at key 550
    is the user's in 1.0 (dumped, and it arrives: 2.0 ships no row there) but inside a
    range 2.0's condition keeps for itself, so the target counts 0 against the source's
    1 and the import fails ('table … has 0 rows, the source has 1') with every row in
    place, as pg_dump | pg_restore into a newer PostGIS would have it. The target's rows
    that came from the dump should be compared, or the versions compared up front and
    the difference named."""
    source = _source(
        scratch_db,
        f"CREATE SCHEMA codes; CREATE EXTENSION {VERSIONED} SCHEMA codes VERSION '1.0';"
        "INSERT INTO codes.codes VALUES (550, 'mine'), (9000, 'mine too');",
    )
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "completed", job.error
    assert pg.admin(
        "SELECT code, label FROM codes.codes WHERE label LIKE 'mine%%' ORDER BY 1",
        dbname=world.project.database_name,
    ) == [(550, "mine"), (9000, "mine too")]


@pytest.mark.parametrize(
    "write",
    [
        "INSERT INTO capy_config.settings (name, value) VALUES ('late', 'z')",  # a marked configuration sequence
        "INSERT INTO public.counted DEFAULT VALUES",  # a user's serial
    ],
)
def test_a_live_source_written_during_the_copy_imports(settings, scratch_db, monkeypatch, write):
    """Attacks "only the sequences whose values pg_dump dumps are compared", live. The
    source's expected sequence values are read in Snapshot.open (inventory.describe),
    but sequences are not transactional: pg_dump reads each one's value when it dumps
    it, later. One row inserted on the source (a configuration row with its marked
    serial, or any user row with a serial) between the two fails the import
    permanently ('sequence … is at 5, the source is at 4'): a live source being written
    to can hardly be imported. The expectation should be what the schema archive holds
    (its SEQUENCE SET entries, as an upload's are), not a second read of the source."""
    source = _source(
        scratch_db,
        BASE_SQL
        + "CREATE TABLE public.counted (id serial PRIMARY KEY); INSERT INTO public.counted DEFAULT VALUES;",
    )
    original = live_copy.Snapshot.dump_schema

    def racing(self, *args, **kwargs):
        pg.admin(write, dbname=source)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(live_copy.Snapshot, "dump_schema", racing)
    world = make_world(settings)
    job = run_import(settings, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", job.error


# -- attacks that held -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,flags",
    [
        ("custom", ["--format=custom", "--inserts"]),
        ("plain", ["--format=plain", "--inserts"]),
        ("plain", ["--format=plain", "--column-inserts"]),
        ("custom", ["--format=custom", "--rows-per-insert=1000"]),
        ("tar", ["--format=tar", "--column-inserts"]),
    ],
)
def test_configuration_rows_as_inserts_arrive(settings, store, scratch_db, tmp_path, fmt, flags):
    """A dump that fills the configuration tables with INSERTs (counted for presence
    only): the import completes and the user's rows arrive exactly once beside the
    extension's own."""
    source = _source(scratch_db, BASE_SQL)
    dump = pg.dump_with(source, tmp_path / f"source.{fmt}", *flags)
    world = make_world(settings)
    job = upload_and_import(settings, store, world, dump)
    assert job.state == "completed", job.error
    live = world.project.database_name
    assert _user_settings(live) == _user_settings(source)
    assert pg.admin("SELECT count(*) FROM capy_config.settings", dbname=live) == [(4,)]


def test_a_live_write_after_the_snapshot_is_not_counted(settings, scratch_db, monkeypatch):
    """The live source's configuration counts race with the source's writes: rows added
    to and deleted from a configuration table after the snapshot (before pg_dump dumps
    the schema) are neither dumped nor counted, so the import completes with the
    snapshot's rows. (`schedule`'s identity sequence is not marked, so not compared.)"""
    source = _source(scratch_db, BASE_SQL)
    original = live_copy.Snapshot.dump_schema

    def racing(self, *args, **kwargs):
        pg.admin("INSERT INTO capy_config_jobs.schedule (name, every) VALUES ('late', '1 h')", dbname=source)
        pg.admin("DELETE FROM capy_config_jobs.schedule WHERE name = 'vacuum'", dbname=source)
        pg.admin("UPDATE capy_config.settings SET value = 'changed' WHERE name = 'tenant_a'", dbname=source)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(live_copy.Snapshot, "dump_schema", racing)
    world = make_world(settings)
    job = run_import(settings, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", job.error
    live = world.project.database_name
    assert [(n, v) for _, n, v in _user_settings(live)] == [("tenant_a", "x"), ("tenant_b", "y")]
    assert job.facts.report["tables"]["capy_config_jobs.schedule"] == {"source_rows": 2, "target_rows": 2}


def test_a_source_user_that_cannot_read_a_configuration_table_fails_plainly(settings, scratch_db):
    """A source user that may read the user's tables but not the extension's
    configuration (made by a superuser on the source): the import fails permanently,
    naming the table and the user, not as a transient or internal error."""
    source = _source(scratch_db, BASE_SQL)
    role = "capy_hx2_reader_" + pg.scratch_name("r").rsplit("_", 1)[-1]
    pg.admin(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        pg.admin(
            sql.SQL(
                "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {0}; GRANT USAGE ON SCHEMA capy_config TO {0}"
            ).format(sql.Identifier(role)),
            dbname=source,
        )
        world = make_world(settings)
        url = pg.url_for(source, sslmode="disable").replace("postgres@", f"{role}@")
        job = run_import(settings, world, url)
        assert job.state == "failed"
        assert job.retry_classification == "permanent", job.error
        assert "settings" in (job.error or "") and role in (job.error or ""), job.error
    finally:
        pg.admin(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)), dbname=source)
        pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("way", ["live", "custom", "plain"])
def test_sequences_beside_extension_sequences(settings, store, scratch_db, tmp_path, way):
    """The sequence filter: a user identity sequence and a serial in a schema needing
    quoting, a user sequence a configuration table's column is given as its default (not
    an extension member), next to the extension's marked sequence and its unmarked
    identity sequence: every user sequence and the marked one arrive at the source's
    value; the import completes."""
    source = _source(
        scratch_db,
        BASE_SQL
        + 'CREATE SCHEMA "Odd.Seq Sch";'
        + 'CREATE TABLE "Odd.Seq Sch"."T b" (id int GENERATED ALWAYS AS IDENTITY, s serial, v text);'
        + 'INSERT INTO "Odd.Seq Sch"."T b" (v) SELECT g::text FROM generate_series(1, 7) g;'
        + "CREATE SEQUENCE public.mine START 40; SELECT nextval('public.mine');"
        + "ALTER TABLE capy_config.settings ALTER COLUMN value SET DEFAULT nextval('public.mine')::text;"
        + "INSERT INTO capy_config.settings (name) VALUES ('defaulted');",
    )
    world, job = import_in_new_project(settings, store, source, way, tmp_path)
    assert job.state == "completed", job.error
    live = world.project.database_name
    query = (
        "SELECT schemaname, sequencename, last_value FROM pg_sequences "
        "WHERE schemaname NOT IN ('capy_config_jobs') ORDER BY 1, 2"
    )
    assert pg.admin(query, dbname=live) == pg.admin(query, dbname=source)
