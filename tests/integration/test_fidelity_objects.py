"""Each kind of object that must survive an import, checked on its own: the same
catalog query on the source and on the imported database gives the same, non-empty
answer. One live import and one uploaded custom dump of the fidelity fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import pg
from tests.support.imports import run_import, upload_and_import
from tests.support.world import make_world

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

OBJECTS = {
    "partitioned tables and their partitions": """
        SELECT p.relname, c.relname, pg_get_expr(c.relpartbound, c.oid)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relkind = 'p' ORDER BY 1, 2""",
    "identity columns": """
        SELECT attrelid::regclass::text, attname, attidentity FROM pg_attribute
        WHERE attidentity <> '' ORDER BY 1, 2""",
    "serial and standalone sequences at their values": """
        SELECT schemaname, sequencename, start_value, increment_by, last_value FROM pg_sequences ORDER BY 1, 2""",
    "materialized views, unpopulated ones unpopulated": """
        SELECT schemaname, matviewname, ispopulated FROM pg_matviews ORDER BY 1, 2""",
    "large objects": """
        SELECT m.oid::bigint, md5(coalesce(string_agg(l.data, ''::bytea ORDER BY l.pageno), ''::bytea)),
               obj_description(m.oid, 'pg_largeobject')
        FROM pg_largeobject_metadata m LEFT JOIN pg_largeobject l ON l.loid = m.oid GROUP BY m.oid ORDER BY 1""",
    "extensions in non-default schemas": """
        SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace ORDER BY 1""",
    "row-level security policies": """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, p.polname, p.polcmd,
               pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
        FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid ORDER BY 1, 4""",
    "generated columns": """
        SELECT attrelid::regclass::text, attname, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attgenerated = 's' ORDER BY 1, 2""",
    "domains, enums and composite types": """
        SELECT n.nspname, t.typname, t.typtype, pg_catalog.format_type(t.typbasetype, t.typtypmod),
               (SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = t.oid)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
          AND (t.typtype IN ('d', 'e') OR (t.typtype = 'c' AND c.relkind = 'c'))
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = t.oid AND d.deptype = 'e')
        ORDER BY 1, 2""",
    "comments": """
        SELECT c.classoid::regclass::text, c.objsubid, c.description FROM pg_description c
        WHERE c.classoid <> 'pg_proc'::regclass OR c.objoid >= 16384 ORDER BY 1, 3, 2""",
    "non-ASCII, quoted and mixed-case identifiers": """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm') AND (n.nspname || c.relname) !~ '^[a-z0-9_]*$' ORDER BY 1, 2""",
    "tables with no columns": """
        SELECT c.relname FROM pg_class c
        WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
        ORDER BY 1""",
    "very long names": """
        SELECT 'class', relname FROM pg_class WHERE octet_length(relname) = 63
        UNION ALL SELECT 'column', attname FROM pg_attribute WHERE octet_length(attname) = 63
        UNION ALL SELECT 'constraint', conname FROM pg_constraint WHERE octet_length(conname) = 63
        ORDER BY 1, 2""",
}


@pytest.fixture(scope="module")
def fidelity_source():
    name = pg.create_db(pg.scratch_name("capysrc_objects"))
    pg.psql(name, file=FIXTURES / "fidelity.sql")
    yield name
    pg.drop_db(name)


@pytest.fixture(scope="module", params=["live", "custom upload"])
def imported(request, control_db, store, fidelity_source, tmp_path_factory):
    world = make_world(control_db)
    if request.param == "live":
        job = run_import(control_db, world, pg.url_for(fidelity_source, sslmode="disable"))
    else:
        dump = pg.make_dump(fidelity_source, "custom", tmp_path_factory.mktemp("objects") / "fx.dump")
        job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    return world.project.database_name


@pytest.mark.parametrize("kind", sorted(OBJECTS))
def test_object_kind_survives(imported, fidelity_source, kind):
    source = pg.admin(OBJECTS[kind], dbname=fidelity_source)
    assert source, f"the fixture has no {kind}"
    assert pg.admin(OBJECTS[kind], dbname=imported) == source


def test_zero_column_table_keeps_its_rows(imported, fidelity_source):
    query = "SELECT count(*) FROM public.no_cols_rows"
    assert pg.admin(query, dbname=imported) == pg.admin(query, dbname=fidelity_source) == [(3,)]
