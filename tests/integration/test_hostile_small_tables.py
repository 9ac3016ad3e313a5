"""Hostile review of small tables loaded by a plain COPY (no TRUNCATE, no FREEZE:
stages.copy.stream.FREEZE_MIN_BYTES). The finalize verification does not count a
copied table again: it trusts the COPY's own `n`, which is the table's row count only
if the table was empty before the COPY. An uploaded archive's pre-data is the
uploader's SQL: it can put rows in a table before its COPY."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import pg
from tests.support.archiveedit import find, overwrite
from tests.support.imports import upload_and_import
from tests.support.world import make_world

COMMENT = "x" * 60
SCHEMA = f"""
CREATE TABLE aa (id int PRIMARY KEY, t text); INSERT INTO aa SELECT g, 'a' FROM generate_series(101, 200) g;
COMMENT ON TABLE aa IS '{COMMENT}';
"""


@pytest.fixture
def source():
    name = pg.create_db(pg.scratch_name("capysrc_hostile_small"))
    pg.psql(name, text=SCHEMA)
    yield name
    pg.drop_db(name)


@pytest.mark.parametrize("freeze_min_bytes", [None, 0], ids=["small-plain-copy", "control-truncate-freeze"])
def test_rows_a_pre_data_entry_puts_in_a_small_table_are_counted_or_refused(
    control_db, store, source, tmp_path, monkeypatch, freeze_min_bytes
):
    if freeze_min_bytes is not None:  # every table takes the TRUNCATE + COPY FREEZE path (as before bb62db7)
        monkeypatch.setattr("stages.copy.stream.FREEZE_MIN_BYTES", freeze_min_bytes)
    path = tmp_path / "a.dump"
    subprocess.run(
        ["pg_dump", "-Fc", "-d", pg.url_for(source), f"--file={path}"], check=True, capture_output=True
    )
    where = find(path, "COMMENT", b"TABLE aa").strings["definition"]
    original = path.read_bytes()[where[0] : where[0] + where[1]]
    injected = b"INSERT INTO public.aa VALUES (1, 'planted');\n--"
    overwrite(path, where, injected + b"-" * (len(original) - len(injected) - 1) + b"\n")

    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, path.read_bytes(), recreate=True)
    if job.state != "completed":
        return  # refused or failed: no wrong database was handed over
    live = pg.row_counts(world.project.database_name)["public.aa"]
    reported = job.facts.report["tables"]["public.aa"]
    # The report (and the verification behind it) must describe the database handed over.
    assert reported["target_rows"] == live, (reported, live)
