"""Hostile: an uploaded archive whose table of contents was edited in place
(tests.support.archiveedit) so that a table looks plain (stages.preflight.implied:
is_plain_table) but cannot be created. The rehearsal now leaves such a table out when
it is not its schema's first, so the preflight passes and only the restore, later,
fails. (A schema-only dump: in a dump with data every TABLE DATA entry depends
on its table, so no table is left out there.) Same rule as test_hostile_implied_keys: the preflight must fail, naming it."""

from __future__ import annotations

import subprocess

import pytest

from stages.preflight import SCHEMA_REHEARSAL
from tests.support import pg
from tests.support.archiveedit import find, overwrite
from tests.support.rehearsing import preflight_checks_of_upload

SCHEMA = """
CREATE TABLE aaa_first (id int);
CREATE TABLE aab_second (id int);
CREATE TABLE t (ab int, ac int, code varchar(5));
INSERT INTO t SELECT g, g, 'x' FROM generate_series(1, 100) g;
"""


@pytest.fixture
def source():
    name = pg.create_db(pg.scratch_name("capysrc_hostile_plaintab"))
    pg.psql(name, text=SCHEMA)
    yield name
    pg.drop_db(name)


EDITS = {
    # column "ab" specified more than once
    "duplicate-column": (b"    ac integer,", b"    ab integer,"),
    # length for type varchar must be at least 1
    "varchar-0": (b"character varying(5)", b"character varying(0)"),
}


def _edited(source: str, tmp_path, edit: tuple[bytes, bytes]) -> bytes:
    path = tmp_path / "a.dump"
    subprocess.run(
        ["pg_dump", "-Fc", "--schema-only", "-d", pg.url_for(source), f"--file={path}"],
        check=True,
        capture_output=True,
    )
    where = find(path, "TABLE", b"t").strings["definition"]
    text = path.read_bytes()[where[0] : where[0] + where[1]]
    old, new = edit
    assert old in text, text
    overwrite(path, where, text.replace(old, new))
    return path.read_bytes()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_plain_looking_table_that_cannot_be_created_fails_the_preflight(
    control_db, store, source, tmp_path, edit
):
    dump = _edited(source, tmp_path, EDITS[edit])
    checks = preflight_checks_of_upload(control_db, store, dump)
    assert checks[SCHEMA_REHEARSAL].status == "fail", checks[SCHEMA_REHEARSAL].detail
