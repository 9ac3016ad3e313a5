"""Which table each index and constraint of an uploaded archive belongs to, from its
dependencies (stages.copy.archive): the engine builds what belongs to a copied table
as soon as its rows are in, beside the other tables' copies; what belongs to none
waits for the end of the copy, alone.

Found: pg_dump lists an index's table once per column it indexes (an index on two
columns depends on its table twice), so every multi-column index of an upload waited
for the end of the copy: `mix`'s index on events (account_id, created_at), 3.1 s
after the trigram index's 55 s instead of beside it."""

from __future__ import annotations

import pytest

from stages.copy.archive import SECTION_POST_DATA, _owners
from stages.dumps.archivetoc import read_toc
from tests.support import pg

SCHEMA = """
CREATE TABLE parent (id int PRIMARY KEY, a int, b int, UNIQUE (a, b));
CREATE TABLE child (
    id int, parent_id int REFERENCES parent, at timestamptz, label text,
    PRIMARY KEY (id, parent_id)
);
CREATE INDEX child_parent_at ON child (parent_id, at);
CREATE INDEX child_three ON child (parent_id, at, label);
CREATE INDEX child_lower ON child (lower(label), parent_id);
CREATE INDEX child_partial ON child (at, label) WHERE parent_id > 0;
ALTER TABLE child ADD CONSTRAINT child_label_at UNIQUE (label, at);
"""


@pytest.fixture
def archive(tmp_path):
    name = pg.create_db(pg.scratch_name("capy_t_owners"))
    try:
        pg.psql(name, text=SCHEMA)
        yield read_toc(str(pg.make_dump(name, "custom", tmp_path / "owners.dump")))
    finally:
        pg.drop_db(name)


def test_every_index_and_constraint_of_a_table_belongs_to_it_however_many_columns(archive):
    tables = {e.dump_id: e for e in archive.entries if e.desc == "TABLE"}
    post = [e for e in archive.entries if e.section == SECTION_POST_DATA]
    owned = _owners(archive, tables, {e.dump_id for e in archive.entries})
    expected = {e.tag.decode(): e.desc for e in post}
    assert set(expected.values()) == {"INDEX", "CONSTRAINT", "FK CONSTRAINT"}
    got = {
        e.tag.decode(): (tables[owned[e.dump_id].table].tag.decode(), owned[e.dump_id].kind)
        for e in post
        if e.dump_id in owned
    }
    assert got == {
        "parent parent_pkey": ("parent", "constraint"),
        "parent parent_a_b_key": ("parent", "constraint"),
        "child child_pkey": ("child", "constraint"),
        "child child_label_at": ("child", "constraint"),
        "child_parent_at": ("child", "index"),
        "child_three": ("child", "index"),
        "child_lower": ("child", "index"),
        "child_partial": ("child", "index"),
        "child child_parent_id_fkey": ("child", "foreign key"),
    }
