"""A small table's indexes, constraints and ANALYZE run as one task of the copy, in one
transaction (stages.copy.engine.SMALL_TABLE_BYTES); a larger table's stay tasks of
their own. Either way the copy is the source: the same schema, rows and statistics.
"""

from __future__ import annotations

import threading

import psycopg2
import pytest

import stages.copy.engine as engine
from stages.errors import ClusterUnavailable, PermanentError, TransientError
from tests.support import pg
from tests.support.copying import CopyRun, copied_as_source, record_builds, source_url

SCHEMA = """
CREATE FUNCTION public.folded(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower(t) $$;
CREATE TABLE public.parent (id int PRIMARY KEY, name text NOT NULL UNIQUE);
INSERT INTO public.parent SELECT g, 'P' || g FROM generate_series(1, 50) g;
CREATE TABLE public.kid_a (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES public.parent, label text);
CREATE TABLE public.kid_b (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES public.parent, label text);
CREATE INDEX kid_a_label ON public.kid_a (label);
CREATE INDEX kid_a_folded ON public.kid_a (public.folded(label));
CREATE INDEX kid_b_label ON public.kid_b (label) WHERE label <> '';
INSERT INTO public.kid_a SELECT g, 1 + g % 50, 'Label ' || g FROM generate_series(1, 300) g;
INSERT INTO public.kid_b SELECT g, 1 + g % 50, 'Other ' || g FROM generate_series(1, 200) g;
CREATE TABLE public.bare (id int, note text);
INSERT INTO public.bare SELECT g, 'n' FROM generate_series(1, 30) g;
"""
TABLES = ("parent", "kid_a", "kid_b", "bare")


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    return record_builds(monkeypatch)


def analyzed(dbname: str, table: str) -> bool:
    return bool(
        pg.admin(
            "SELECT 1 FROM pg_stats WHERE schemaname = 'public' AND tablename = %s", (table,), dbname=dbname
        )
    )


def test_a_small_tables_indexes_constraints_and_statistics_are_one_task(scratch_db, tmp_path, builds):
    source, target = scratch_db("capysrc_small"), scratch_db("capytgt_small")
    pg.psql(source, text=SCHEMA)
    copied_as_source(source, target, tmp_path)
    at_once = [what for what in builds if what.startswith("the ")]
    assert sorted(at_once) == [
        "the indexes, constraints and statistics of table public.kid_a",
        "the indexes, constraints and statistics of table public.kid_b",
        "the indexes, constraints and statistics of table public.parent",
        "the statistics of table public.bare",
    ], builds
    # Nothing else but the foreign keys (after the builds of both of their tables), both
    # small tables' keys into parent in one transaction (engine.KEY_BATCH).
    assert [what for what in builds if what not in at_once] == [
        "2 foreign keys into table public.parent",
    ], builds
    for table in TABLES:
        assert analyzed(target, table), table
    # ANALYZE ran after the expression index was built: its statistics are there too.
    assert analyzed(target, "kid_a_folded")
    assert pg.admin(
        "SELECT reltuples::int FROM pg_class WHERE oid = 'public.kid_a'::regclass", dbname=target
    ) == [(300,)]


def test_a_table_at_the_threshold_keeps_its_builds_as_tasks_of_their_own(
    scratch_db, tmp_path, builds, monkeypatch
):
    monkeypatch.setattr(engine, "SMALL_TABLE_BYTES", 1)
    source, target = scratch_db("capysrc_small"), scratch_db("capytgt_small")
    pg.psql(source, text=SCHEMA)
    copied_as_source(source, target, tmp_path)
    assert not [what for what in builds if what.startswith("the indexes")], builds
    assert "index kid_a_folded" in builds and "the constraints of table public.kid_a" in builds, builds
    assert "statistics of table public.bare" in builds, builds
    for table in (*TABLES, "kid_a_folded"):
        assert analyzed(target, table), table


def test_a_table_of_a_megabyte_or_more_builds_its_keys_beside_its_other_index(scratch_db, tmp_path, builds):
    """From SEPARATE_KEY_MIN_BYTES (1 MB) a table's primary key and unique constraint are
    built as unique indexes, tasks of their own beside its other index, then attached."""
    source, target = scratch_db("capysrc_small"), scratch_db("capytgt_small")
    pg.psql(
        source,
        text="""
CREATE TABLE public.mid (id int PRIMARY KEY, code text NOT NULL UNIQUE, label text);
CREATE INDEX mid_label ON public.mid (label);
INSERT INTO public.mid SELECT g, 'c' || g, repeat('x', 40) || g FROM generate_series(1, 30000) g;
""",
    )
    assert pg.admin("SELECT pg_relation_size('public.mid')", dbname=source)[0][0] < 8 << 20
    copied_as_source(source, target, tmp_path)
    assert {"constraint mid mid_pkey", "constraint mid mid_code_key", "index mid_label"} <= set(builds), (
        builds
    )
    assert "the constraints of table public.mid" in builds, builds  # the attaches


def test_the_catalog_reads_key_definitions_only_of_tables_whose_keys_are_built_apart(scratch_db):
    """pg_get_indexdef for every key was most of the catalog's read of 2,000 small
    tables: only a table of `key_definitions_from` bytes or more gets its keys' index
    definitions (the copy builds a smaller one's with the dump's ALTER TABLE)."""
    from stages.copy.catalog import read_catalog

    source = scratch_db("capysrc_small")
    pg.psql(
        source,
        text=SCHEMA
        + "CREATE TABLE public.mid (id int PRIMARY KEY, code text NOT NULL UNIQUE);"
        + "INSERT INTO public.mid SELECT g, repeat('c', 40) || g FROM generate_series(1, 30000) g;",
    )
    conn = psycopg2.connect(pg.url_for(source))
    try:
        with conn.cursor() as cur:
            cur.execute("SET search_path = pg_catalog, pg_temp")

        def definitions(threshold: int) -> list[tuple[str, str | None]]:
            """(table, its key's index definition or None) per primary key and unique constraint."""
            catalog = read_catalog(conn, key_definitions_from=threshold)
            names = {t.oid: t.name for t in catalog.tables}
            return sorted(
                (
                    (names[o.table], o.unique_index)
                    for o in catalog.owned.values()
                    if o.kind == "constraint" and o.table in names  # not the system catalogs' keys
                ),
                key=lambda pair: (pair[0], pair[1] or ""),
            )

        every = definitions(0)
        assert [table for table, _ in every] == ["kid_a", "kid_b", "mid", "mid", "parent", "parent"], every
        assert all(definition for _, definition in every), every
        assert ("mid", "CREATE UNIQUE INDEX mid_code_key ON public.mid USING btree (code)") in every
        sizes = {t.name: t.bytes for t in read_catalog(conn).tables}
        assert sizes["mid"] > max(size for name, size in sizes.items() if name != "mid"), sizes
        only_mid = definitions(sizes["mid"])
        # Every key is still there; only mid's carry their definitions.
        assert [table for table, _ in only_mid] == [table for table, _ in every]
        assert [table for table, definition in only_mid if definition] == ["mid", "mid"], only_mid
        # No table that large: the query is sent an empty list, and reads no definition.
        assert not any(definition for _, definition in definitions(sizes["mid"] + 1))
    finally:
        conn.close()


def test_a_failing_build_of_a_small_table_names_the_table_and_fails_the_copy(scratch_db, tmp_path):
    source, target = scratch_db("capysrc_small"), scratch_db("capytgt_small")
    pg.psql(source, text=SCHEMA)

    def break_the_index() -> None:
        # The index's function is gone from the preview: its build fails.
        pg.psql(target, text="DROP FUNCTION public.folded(text);")

    run = CopyRun(source_url(source), target, tmp_path, before_copy=break_the_index)
    with pytest.raises(PermanentError) as raised:
        run.run()
    message = str(raised.value)
    assert message.startswith(
        "creating the indexes, constraints and statistics of table public.kid_a in the preview failed: "
    ), message
    assert "folded" in message, message
    # The transaction rolled back whole: neither the key nor the other index is left.
    assert not pg.admin(
        "SELECT 1 FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'kid_a'", dbname=target
    )


def test_a_failing_foreign_key_of_a_batch_is_named_and_none_of_the_batch_is_left(scratch_db, tmp_path):
    source, target = scratch_db("capysrc_small"), scratch_db("capytgt_small")
    pg.psql(source, text=SCHEMA)

    def add_an_orphan() -> None:
        # The preview's kid_b gains a row whose parent does not exist as its rows load.
        pg.psql(
            target,
            text="""
CREATE FUNCTION public.orphan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.kid_b VALUES (100000, 99999, 'orphan'); RETURN NULL; END $$;
CREATE TRIGGER orphan AFTER INSERT ON public.kid_b FOR EACH ROW WHEN (NEW.id = 1)
    EXECUTE FUNCTION public.orphan();
""",
        )

    run = CopyRun(source_url(source), target, tmp_path, before_copy=add_an_orphan)
    with pytest.raises(PermanentError) as raised:
        run.run()
    message = str(raised.value)
    # The key that failed, by name, as when each key was a transaction of its own.
    assert message.startswith(
        'creating foreign key kid_b kid_b_parent_id_fkey in the preview failed: insert or update on table "kid_b" '
        'violates foreign key constraint "kid_b_parent_id_fkey"'
    ), message
    # One transaction: kid_a's key, which its rows satisfy, is not left either.
    assert not pg.admin("SELECT conname FROM pg_constraint WHERE contype = 'f'", dbname=target)


def test_a_deadlock_between_two_builds_is_named_and_retried_not_a_lost_session(scratch_db):
    """A deadlock with another of the copy's sessions (a function in one table's index
    reading the other's) leaves both sessions well: it says so and the stage is retried,
    where it was reported as the cluster being unavailable."""
    db = scratch_db("capytgt_small")
    pg.psql(db, text="CREATE TABLE public.a (id int); CREATE TABLE public.b (id int);")
    sessions = [psycopg2.connect(pg.url_for(db)) for _ in range(2)]
    outcomes: list[BaseException | None] = [None, None]
    for conn, table in zip(sessions, ("a", "b"), strict=True):
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")

    def lock(index: int, table: str) -> None:
        try:
            with engine.target_errors(f"creating the indexes of table public.{table} in the preview"):
                with sessions[index].cursor() as cur:
                    cur.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
        except BaseException as err:  # noqa: BLE001 - examined below
            outcomes[index] = err
            sessions[index].rollback()

    threads = [threading.Thread(target=lock, args=(0, "b")), threading.Thread(target=lock, args=(1, "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        failed = [err for err in outcomes if err is not None]
        assert len(failed) == 1, outcomes
        err = failed[0]
        assert isinstance(err, TransientError) and not isinstance(err, ClusterUnavailable), repr(err)
        assert "in the preview failed: deadlock detected; the import is retried" in str(err), str(err)
        # If every attempt of the stage meets it, the job fails saying what to change.
        assert "failed on every attempt: deadlock detected" in (err.when_repeated or ""), err.when_repeated
        assert "must not read tables" in (err.when_repeated or "")
    finally:
        for conn in sessions:
            conn.close()


def test_a_partitioned_table_whose_analyze_fails_leaves_the_copy_whole(scratch_db, tmp_path, caplog):
    """The partitioned tables' ANALYZE at the end of the copy makes statistics only: one
    that fails (an expression statistic calling a function that raises there) is
    logged, and the copy, whole, goes on to be verified."""
    source, target = scratch_db("capysrc_small"), scratch_db("capytgt_small")
    pg.psql(
        source,
        text="""
        CREATE FUNCTION public.picky(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN
            IF pg_catalog.current_database() LIKE 'capytgt%' THEN RAISE EXCEPTION 'no statistics here'; END IF;
            RETURN x;
        END $$;
        CREATE TABLE public.parted (id int, v int) PARTITION BY RANGE (id);
        CREATE TABLE public.parted_a PARTITION OF public.parted FOR VALUES FROM (0) TO (1000);
        INSERT INTO public.parted SELECT g, g FROM generate_series(1, 500) g;
        CREATE STATISTICS public.parted_picky ON (public.picky(v)), id FROM public.parted;
        """,
    )
    with caplog.at_level("WARNING", logger="stages.copy.engine"):
        copied_as_source(source, target, tmp_path)
    assert any(
        "the partitioned tables were not analyzed" in r.getMessage()
        and "no statistics here" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert analyzed(target, "parted_a")
