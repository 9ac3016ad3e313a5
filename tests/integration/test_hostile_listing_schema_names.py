"""Hostile: one `pg_restore --list --create` must tell what `pg_restore --list` lists.

toc.parse takes the namespace as one word, so a comment (or ACL, security label) on an
object in a schema whose name has a space followed by "DATABASE " parses as an entry
named "DATABASE …": is_database_entry sets it apart, and the import's restore list
(toc.read_with_database's first list) no longer holds it, though pg_restore --list does
(pg_restore decides on the entry's tag, "TABLE t", not on our parse)."""

from __future__ import annotations

import subprocess

from stages.dumps import toc
from stages.tools.commands import PgTools
from tests.support import pg
from tests.support.copying import PG_BIN

OBJECTS = """
CREATE SCHEMA "a DATABASE b";
CREATE TABLE "a DATABASE b".t (id int);
COMMENT ON TABLE "a DATABASE b".t IS 'the table''s comment';
COMMENT ON COLUMN "a DATABASE b".t.id IS 'the column''s comment';
GRANT SELECT ON "a DATABASE b".t TO PUBLIC;
COMMENT ON DATABASE {db} IS 'the database''s own comment';
"""


def _archive(name: str, tmp_path, fmt: str) -> str:
    archive = tmp_path / f"a.{fmt}"
    subprocess.run(["pg_dump", f"-F{fmt}", "-d", pg.url_for(name), f"--file={archive}"], check=True)
    return str(archive)


def test_comments_and_grants_in_a_schema_named_with_database_stay_in_the_listing(scratch_db, tmp_path):
    name = scratch_db("capysrc_hostile_listing")
    pg.psql(name, text=OBJECTS.format(db=f'"{name}"'))
    for fmt in ("c", "t"):
        archive = _archive(name, tmp_path, fmt)
        tools = PgTools(PG_BIN)
        entries, database = toc.read_with_database(tools, archive)
        assert [e.line for e in entries] == [e.line for e in toc.read(tools, archive)], fmt
        assert sorted(e.desc for e in database) == ["COMMENT", "DATABASE"], fmt
        # What the import restores (stages.dumps.toc.plan of the first list) keeps the table's comment.
        kept = toc.plan(entries, precreated_schemas=set()).keep
        assert any(e.desc == "COMMENT" and "TABLE t" in e.line for e in kept), fmt
