"""Hostile review of the rehearsal's implied entries (stages.preflight.implied): an
uploaded archive whose table of contents was edited in place (tests.support.archiveedit)
so that a key looks plain but cannot be created (a reserved word as a column name,
which pg_dump would have quoted): the rehearsal runs it, and the preflight fails naming
it, before anything is copied."""

from __future__ import annotations

import subprocess

import pytest

from stages.preflight import SCHEMA_REHEARSAL
from tests.support import pg
from tests.support.archiveedit import find, overwrite
from tests.support.rehearsing import preflight_checks_of_upload
from tests.support.world import make_world

SCHEMA = """
CREATE TABLE t (id int, usex int);
ALTER TABLE t ADD CONSTRAINT t_k UNIQUE (usex);
INSERT INTO t SELECT g, g FROM generate_series(1, 100) g;
"""


@pytest.fixture
def source():
    name = pg.create_db(pg.scratch_name("capysrc_hostile_implied"))
    pg.psql(name, text=SCHEMA)
    yield name
    pg.drop_db(name)


def _key_on_a_reserved_word(source: str, tmp_path) -> bytes:
    """A custom dump of `source` whose unique key is on column `user`, unquoted: a syntax
    error (USER is reserved), which pg_dump would have quoted."""
    path = tmp_path / "a.dump"
    subprocess.run(
        ["pg_dump", "-Fc", "-d", pg.url_for(source), f"--file={path}"], check=True, capture_output=True
    )
    where = find(path, "CONSTRAINT", b"t t_k").strings["definition"]
    text = path.read_bytes()[where[0] : where[0] + where[1]]
    assert b"UNIQUE (usex);" in text
    overwrite(path, where, text.replace(b"UNIQUE (usex);", b"UNIQUE (user);"))
    return path.read_bytes()


def test_a_key_on_a_reserved_word_fails_the_preflight(control_db, store, source, tmp_path):
    dump = _key_on_a_reserved_word(source, tmp_path)
    checks = preflight_checks_of_upload(control_db, store, dump)
    assert checks[SCHEMA_REHEARSAL].status == "fail", checks[SCHEMA_REHEARSAL].detail


def test_the_import_of_it_fails_at_its_preflight(control_db, store, source, tmp_path):
    from tests.support.imports import upload_and_import

    dump = _key_on_a_reserved_word(source, tmp_path)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump, recreate=True)
    assert (job.state, job.stage, job.retry_classification) == ("failed", "preflight", "permanent")
    assert "schema_rehearsal" in job.error and "t_k" in job.error
