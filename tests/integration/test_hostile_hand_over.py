"""The batched hand-over, attacked (stages.database.cluster.ClusterAdmin._reassign_in_batches)
on a cluster of its own with a small lock table (as tests/integration/test_small_cluster.py):
every relation the restore role owned ends up the project role's, nothing else changes
hands, and no batch needs more locks than such a cluster has."""

from __future__ import annotations

import psycopg2
import pytest

from stages.database.cluster import ClusterAdmin
from tests.support.pgcluster import temporary_cluster

SMALL = "-c max_connections=20 -c max_locks_per_transaction=10 -c max_prepared_transactions=5"
RESTORER, PROJECT, OTHER = "capy_restore_review", "capy_prj_review", "someone_else"


@pytest.fixture(scope="module")
def small():
    with temporary_cluster(settings=SMALL) as cluster:
        yield cluster


def _run(cluster, dbname: str, text: str, *, user: str | None = None) -> list[tuple]:
    conn = psycopg2.connect(cluster.url(dbname, user=user, password=cluster.password))
    conn.autocommit = True
    try:
        rows: list[tuple] = []
        with conn.cursor() as cur:
            # A line, a transaction: the small lock table holds no more than a few tables' locks.
            for line in text.splitlines():
                if line.strip():
                    cur.execute(line)
                    rows = cur.fetchall() if cur.description else []
        return rows
    finally:
        conn.close()


def _fresh(cluster, name: str) -> None:
    for (old,) in _run(
        cluster, "postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'capy_review_%'"
    ):
        _run(cluster, "postgres", f'DROP DATABASE "{old}" WITH (FORCE)')
    for role in (RESTORER, PROJECT, OTHER):
        rows = _run(cluster, "postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'")
        if rows:
            for (db,) in _run(cluster, "postgres", "SELECT datname FROM pg_database WHERE datallowconn"):
                _run(cluster, db, f'REASSIGN OWNED BY "{role}" TO capy_admin; DROP OWNED BY "{role}"')
            _run(cluster, "postgres", f'DROP ROLE "{role}"')
    _run(
        cluster,
        "postgres",
        f"CREATE ROLE {RESTORER} LOGIN PASSWORD '{cluster.password}'; CREATE ROLE {PROJECT}; CREATE ROLE {OTHER}",
    )
    _run(cluster, "postgres", f'CREATE DATABASE "{name}" OWNER {RESTORER}')
    _run(cluster, name, f"GRANT ALL ON SCHEMA public TO {RESTORER}")


def _owners(cluster, dbname: str) -> dict[str, str]:
    rows = _run(
        cluster,
        dbname,
        "SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'",
    )
    return dict(rows)


def test_tables_with_many_constraint_indexes_fit_the_small_lock_table(small):
    """An index made by a PRIMARY KEY, UNIQUE or EXCLUDE constraint depends on its
    constraint, not on its table: the batch's count of locked relations missed them, and
    a batch of such tables took hundreds of locks in one transaction ("out of shared
    memory" on a cluster whose lock table the one-at-a-time hand-over fitted)."""
    name = "capy_review_uniques"
    _fresh(small, name)
    columns = ", ".join(f"c{i} int UNIQUE" for i in range(100))
    script = "".join(f"CREATE TABLE public.u{t} (id int PRIMARY KEY, {columns});\n" for t in range(30))
    _run(small, name, script, user=RESTORER)
    ClusterAdmin(small.url()).hand_over(name, from_role=RESTORER, to_role=PROJECT)
    owners = _owners(small, name)
    assert owners and set(owners.values()) == {PROJECT}, owners


def test_partitions_are_given_over_in_batches_of_their_own(small):
    """A partition depends on its parent in pg_depend (deptype 'a'), as a sequence owned
    by a column does on its table, and was left out of the batches; ALTER TABLE … OWNER
    of the parent does not reach it, so REASSIGN OWNED gave every partition over in one
    transaction: on this small lock table, "out of shared memory" (found by review)."""
    name = "capy_review_partitions"
    _fresh(small, name)
    script = (
        "CREATE TABLE public.parted (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);\n"
    )
    script += "".join(
        f"CREATE TABLE public.part{i} PARTITION OF public.parted FOR VALUES FROM ({i}) TO ({i + 1});\n"
        for i in range(400)
    )
    _run(small, name, script, user=RESTORER)
    ClusterAdmin(small.url()).hand_over(name, from_role=RESTORER, to_role=PROJECT)
    owners = _owners(small, name)
    assert len(owners) == 802 and set(owners.values()) == {
        PROJECT
    }  # 400 partitions, their keys, the parent's


def test_hostile_names_and_every_kind_of_relation_are_handed_over(small):
    name = "capy_review_kinds"
    _fresh(small, name)
    weird = ['a"b', "semi;colon", "x'); DROP TABLE keep; --", "ünïcødé", "t" * 63, "%s %(x)s", " lead"]
    script = "CREATE TABLE public.keep (id int);\n"
    for table in weird:
        ident = '"' + table.replace('"', '""') + '"'
        script += f"CREATE TABLE public.{ident} (id serial PRIMARY KEY, v text, w int GENERATED ALWAYS AS IDENTITY);\n"
        script += f"CREATE INDEX ON public.{ident} (v); CREATE INDEX ON public.{ident} (lower(v));\n"
    script += "CREATE TABLE public.wide (id int, v text);\n"
    script += "".join(f"CREATE INDEX ON public.wide ((id + {i}));\n" for i in range(60))
    script += "CREATE TABLE public.parted (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);\n"
    script += "".join(
        f"CREATE TABLE public.part{i} PARTITION OF public.parted FOR VALUES FROM ({i}) TO ({i + 1});\n"
        for i in range(30)
    )
    script += "CREATE SEQUENCE public.free_seq; CREATE SEQUENCE public.owned_seq;\n"
    script += "CREATE TABLE public.owner_of_seq (n int); ALTER SEQUENCE public.owned_seq OWNED BY public.owner_of_seq.n;\n"
    script += "CREATE VIEW public.v AS SELECT * FROM public.keep;\n"
    script += (
        "CREATE MATERIALIZED VIEW public.mv AS SELECT * FROM public.keep; CREATE INDEX ON public.mv (id);\n"
    )
    script += "CREATE TYPE public.pair AS (a int, b int);\n"
    _run(small, name, script, user=RESTORER)
    # What another role owns stays its own.
    _run(
        small,
        name,
        f"CREATE TABLE public.theirs (id int PRIMARY KEY); ALTER TABLE public.theirs OWNER TO {OTHER}",
    )
    ClusterAdmin(small.url()).hand_over(name, from_role=RESTORER, to_role=PROJECT)
    owners = _owners(small, name)
    assert owners.pop("theirs") == OTHER and owners.pop("theirs_pkey") == OTHER
    assert set(owners.values()) == {PROJECT}, {k: v for k, v in owners.items() if v != PROJECT}
    assert len(owners) > 150
    assert _run(small, name, "SELECT count(*) FROM public.keep") == [(0,)]


def test_a_hand_over_retried_after_a_partial_one_completes(small, monkeypatch):
    name = "capy_review_retry"
    _fresh(small, name)
    _run(
        small,
        name,
        "".join(f"CREATE TABLE public.t{i} (id serial PRIMARY KEY, v text);\n" for i in range(60)),
        user=RESTORER,
    )
    calls = []
    real_execute = psycopg2.extensions.cursor.execute

    class Crashing(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            text = query if isinstance(query, str) else query.as_string(self.connection)
            if text.startswith("ALTER TABLE") and len(calls) == 2:
                calls.append(text)
                raise RuntimeError("the worker died mid-hand-over")
            if text.startswith("ALTER TABLE"):
                calls.append(text)
            return real_execute(self, query, vars)

    admin = ClusterAdmin(small.url())
    real_autocommit = ClusterAdmin.autocommit

    import contextlib

    @contextlib.contextmanager
    def autocommit(self, dbname=None):
        with self.connection(dbname) as conn:
            conn.autocommit = True
            with conn.cursor(cursor_factory=Crashing) as cur:
                yield cur

    monkeypatch.setattr(ClusterAdmin, "autocommit", autocommit)
    with pytest.raises(RuntimeError):
        admin.hand_over(name, from_role=RESTORER, to_role=PROJECT)
    monkeypatch.setattr(ClusterAdmin, "autocommit", real_autocommit)
    owners = _owners(small, name)
    assert {PROJECT, RESTORER} <= set(owners.values())  # part given over
    admin.hand_over(name, from_role=RESTORER, to_role=PROJECT)
    owners = _owners(small, name)
    assert set(owners.values()) == {PROJECT}
