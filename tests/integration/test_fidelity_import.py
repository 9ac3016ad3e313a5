"""Fidelity: the fixture holding every object kind survives a live and an uploaded
import as the project's own (non-superuser) role, and the report says so field by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.database import inventory
from tests.support import pg
from tests.support.imports import run_import, upload_and_import
from tests.support.world import make_world

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CUSTOM_CITEXT_COMMENT = "Case-insensitive text, commented by the fidelity fixture"


@pytest.fixture(scope="module")
def fidelity_source():
    name = pg.create_db(pg.scratch_name("capysrc_fidelity"))
    pg.psql(name, file=FIXTURES / "fidelity.sql")
    yield name
    pg.drop_db(name)


@pytest.fixture(scope="module")
def superuser_source():
    name = pg.create_db(pg.scratch_name("capysrc_superuser"))
    pg.psql(name, file=FIXTURES / "fidelity.sql")
    pg.psql(name, file=FIXTURES / "superuser_objects.sql")
    yield name
    pg.drop_db(name)


def describe(dbname: str) -> dict:
    import psycopg2

    conn = psycopg2.connect(pg.url_for(dbname))
    try:
        return inventory.describe(conn)
    finally:
        conn.close()


def assert_report_matches(report: dict, source: str, live: str, *, basis: str) -> None:
    counts = pg.row_counts(source)
    assert report["tables"] == {t: {"source_rows": n, "target_rows": n} for t, n in counts.items()}
    assert report["table_count"] == len(counts) == 28
    assert report["row_count"] == sum(counts.values())
    assert report["objects_source"] == basis
    source_side, target_side = describe(source), describe(live)
    assert report["sequences"] == {
        name: {"source": v, "target": v} for name, v in source_side["sequences"].items()
    }
    assert report["sequences"]["public.invoice_number_seq"] == {"source": 2007, "target": 2007}
    assert report["sequences"]["public.never_used_seq"] == {"source": None, "target": None}
    assert report["extensions"]["citext"]["target"] == source_side["extensions"]["citext"]
    assert set(report["extensions"]) == {"citext", "hstore", "pg_trgm", "plpgsql"}
    for kind, count in target_side["objects"].items():
        assert report["objects"][kind]["target"] == count, kind
    assert report["objects"]["materialized_views"]["target"] == 2
    assert report["objects"]["large_objects"]["target"] == 3
    assert report["objects"]["policies"]["target"] == 2
    assert report["objects"]["partitions"]["target"] == 7
    assert pg.admin("SELECT matviewname, ispopulated FROM pg_matviews ORDER BY 1", dbname=live) == [
        ("customer_totals", False),
        ("stock_by_warehouse", True),
    ]
    # Everything is owned by the project's role, which is not a superuser.
    owners = pg.admin(
        "SELECT DISTINCT r.rolname, r.rolsuper FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'sales', 'inventory', 'Ünïcødé')",
        dbname=live,
    )
    assert owners == [(live, False)]


@pytest.mark.parametrize("schema_in_slices", [False, True])
def test_live_import_of_every_object_kind(control_db, fidelity_source, monkeypatch, schema_in_slices):
    """Also with the schema restored in slices of a few entries beside the copy, every
    table's rows, psql's way (stages.copy.predata, stages.copy.live.COMMAND_MIN_BYTES):
    a schema of thousands of entries takes that way, and any kind of object may be in it."""
    if schema_in_slices:
        import stages.copy.live
        import stages.copy.predata

        monkeypatch.setattr(stages.copy.predata, "SLICE_MIN_ENTRIES", 0)
        monkeypatch.setattr(stages.copy.predata, "SLICE_FIRST", 2)
        monkeypatch.setattr(stages.copy.live, "COMMAND_MIN_BYTES", 0)
        monkeypatch.setattr(stages.copy.live, "BINARY_COPY", False)  # psql copies in text only
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(fidelity_source, sslmode="disable"))
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert pg.schema_dump(live) == pg.schema_dump(fidelity_source), pg.schema_difference(
        fidelity_source, live
    )
    report = job.facts.report
    assert_report_matches(report, fidelity_source, live, basis="source snapshot")
    assert {k: v["source"] for k, v in report["objects"].items()} == {
        k: v["target"] for k, v in report["objects"].items()
    }
    assert report["skipped"] == [] and report["warnings"] == []


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_uploaded_import_of_every_object_kind(control_db, store, fidelity_source, tmp_path, fmt):
    world = make_world(control_db)
    job = upload_and_import(
        control_db, store, world, pg.make_dump(fidelity_source, fmt, tmp_path / f"fx.{fmt}")
    )
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert pg.schema_dump(live) == pg.schema_dump(fidelity_source)
    report = job.facts.report
    basis = "dump table of contents" if fmt == "custom" else "dump statements"
    assert_report_matches(report, fidelity_source, live, basis=basis)
    # The dump lists every table, partitions included (the catalog counts them apart).
    assert report["objects"]["tables"]["source"] == 30
    assert report["objects"]["tables"]["target"] + report["objects"]["partitions"]["target"] == 30
    assert report["objects"]["large_objects"]["source"] == 3
    assert report["objects"]["materialized_views"]["source"] == 2
    assert report["skipped"] == []


@pytest.mark.parametrize("how", ["live", "custom", "plain"])
def test_superuser_only_objects_are_skipped_with_warnings(control_db, store, superuser_source, tmp_path, how):
    world = make_world(control_db)
    if how == "live":
        job = run_import(control_db, world, pg.url_for(superuser_source, sslmode="disable"))
    else:
        job = upload_and_import(
            control_db, store, world, pg.make_dump(superuser_source, how, tmp_path / f"su.{how}")
        )
    assert job.state == "completed", (job.error, job.last_stderr)
    report = job.facts.report
    skipped = [item["object"] for item in report["skipped"]]
    assert "EVENT TRIGGER capy_ddl_watch" in skipped
    assert report["warnings"][0] == (
        "skipped EVENT TRIGGER capy_ddl_watch: event triggers need superuser, which a managed database does not grant"
    )
    if how == "live":
        assert "event_triggers: 1 on the source, 0 restored" in report["warnings"]
    live = world.project.database_name
    assert pg.admin("SELECT count(*) FROM pg_event_trigger", dbname=live) == [(0,)]
    # The custom comment on the extension is kept: the service, its owner, applies it.
    assert pg.admin(
        "SELECT obj_description(oid, 'pg_extension') FROM pg_extension WHERE extname = 'citext'", dbname=live
    ) == [(CUSTOM_CITEXT_COMMENT,)]
    assert pg.row_counts(live) == pg.row_counts(superuser_source)
