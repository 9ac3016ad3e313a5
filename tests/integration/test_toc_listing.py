"""One listing of an archive with `--create` tells both what pg_restore lists without it
and the database's own entries (stages.dumps.toc.read_with_database)."""

from __future__ import annotations

import subprocess

import pytest

from stages.dumps import toc
from stages.tools.commands import PgTools
from tests.support import pg
from tests.support.copying import PG_BIN

DATABASE_OBJECTS = """
ALTER DATABASE {db} SET work_mem = '7MB';
COMMENT ON DATABASE {db} IS 'the database''s own comment';
REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;
CREATE TABLE "DATABASE x" (id int);
COMMENT ON TABLE "DATABASE x" IS 'a table named like a database entry';
"""


@pytest.mark.parametrize("corpus", ["pagila", "chinook", None])
def test_the_listing_without_the_databases_entries_is_pg_restores_listing(corpus, scratch_db, tmp_path):
    name = scratch_db("capysrc_listing")
    if corpus:
        pg.load_corpus(corpus, name)
    pg.psql(name, text=DATABASE_OBJECTS.format(db=f'"{name}"'))
    archive = tmp_path / "a.dump"
    subprocess.run(["pg_dump", "-Fc", "-d", pg.url_for(name), f"--file={archive}"], check=True)
    tools = PgTools(PG_BIN)
    entries, database = toc.read_with_database(tools, str(archive))
    assert [e.line for e in entries] == [e.line for e in toc.read(tools, str(archive))]
    assert sorted(e.desc for e in database) == ["ACL", "COMMENT", "DATABASE", "DATABASE PROPERTIES"]
    assert any(e.desc == "COMMENT" and e.name == 'TABLE "DATABASE x"' for e in entries)
