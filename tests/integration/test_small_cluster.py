"""A project cluster configured small: few lock slots, prepared transactions allowed.

What a cluster's configuration limits must not make a valid dump fail, and what a
dump may do on a cluster that allows prepared transactions must not outlive its
preview nor stop `sweep` for everyone.
"""

from __future__ import annotations

import secrets

import psycopg2
import pytest

from pipeline import accounts
from pipeline.models import ApiKey, AuditEvent, Cluster, Job, JobEvent, Project, RetiredDatabase, Upload
from pipeline.sealing import Sealer
from pipeline.sweep import sweep
from tests.support.imports import upload_and_import
from tests.support.pgcluster import temporary_cluster
from tests.support.world import World

# A lock table of about 10 × (20 + 5) slots (plus a little slack): far fewer than the
# objects of the dump below, each of which REASSIGN OWNED would lock at once.
SMALL = "-c max_connections=20 -c max_locks_per_transaction=10 -c max_prepared_transactions=5"
TABLES = 400


@pytest.fixture(scope="module")
def small_cluster(control_db):
    with temporary_cluster(settings=SMALL) as cluster:
        registered = accounts.add_cluster(
            "small-" + secrets.token_hex(3),
            cluster.url(password=cluster.password),
            Sealer(control_db.secret_key),
        )
        yield cluster, registered
        _forget(registered)


def _forget(cluster: Cluster) -> None:
    """The cluster is gone with the test: so are its rows (sweep would look for it)."""
    projects = [p.id for p in Project.select(Project.id).where(Project.cluster == cluster.id)]
    jobs = [j.id for j in Job.select(Job.id).where(Job.project.in_(projects))] if projects else []
    if jobs:
        JobEvent.delete().where(JobEvent.job.in_(jobs)).execute()
        Upload.update(job=None).where(Upload.job.in_(jobs)).execute()
        RetiredDatabase.delete().where(RetiredDatabase.job.in_(jobs)).execute()
        Job.delete().where(Job.id.in_(jobs)).execute()
    if projects:
        for model in (Upload, AuditEvent, ApiKey):
            model.delete().where(model.project.in_(projects)).execute()
        Project.delete().where(Project.id.in_(projects)).execute()
    cluster.delete_instance()


def _world(settings, cluster: Cluster) -> World:
    org = accounts.create_organization("Small cluster org")
    project = accounts.create_project(org, "small", Sealer(settings.secret_key), cluster_id=cluster.id)
    return World(org, cluster, project, key="")


def _read(cluster, dbname: str, query: str) -> list[tuple]:
    conn = psycopg2.connect(cluster.url(dbname, password=cluster.password))
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


def test_a_dump_of_many_tables_is_handed_over_within_the_clusters_lock_table(
    control_db, store, small_cluster
):
    """REASSIGN OWNED of every table at once ran out of shared memory ("You might need to
    increase max_locks_per_transaction"): the hand-over gives relations over a few at a time."""
    cluster, registered = small_cluster
    world = _world(control_db, registered)
    script = "".join(f"CREATE TABLE public.t{i} (id serial PRIMARY KEY, v text);\n" for i in range(TABLES))
    script += "COPY public.t0 (id, v) FROM stdin;\n1\tone\n\\.\n"
    job = upload_and_import(control_db, store, world, script.encode())
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    owners = _read(
        cluster,
        live,
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public'",
    )
    assert owners == [(world.project.role_name,)]
    assert _read(
        cluster,
        live,
        "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace",
    ) == [(TABLES,)]


def test_a_prepared_transaction_in_a_dump_outlives_nothing(control_db, store, small_cluster):
    """A dump ending in PREPARE TRANSACTION leaves a transaction no session owns, holding
    its locks: verification and the hand-over roll it back, and a preview left with one
    is still dropped by sweep without stopping the rest of sweep."""
    cluster, registered = small_cluster
    world = _world(control_db, registered)
    script = (
        b"CREATE TABLE public.t (id int);\nCOPY public.t (id) FROM stdin;\n1\n\\.\n"
        b"BEGIN;\nLOCK TABLE public.t IN ACCESS EXCLUSIVE MODE;\nPREPARE TRANSACTION 'capy_hold';\n"
    )
    job = upload_and_import(control_db, store, world, script)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert _read(cluster, "postgres", "SELECT gid FROM pg_prepared_xacts") == []
    assert _read(cluster, world.project.database_name, "SELECT id FROM public.t") == [(1,)]

    # A preview a worker could not clean up, holding a prepared transaction.
    leftover = "capy_preview_" + secrets.token_hex(6)
    admin = accounts.cluster_admin(registered, Sealer(control_db.secret_key))
    admin.create_database(leftover)
    conn = psycopg2.connect(cluster.url(leftover, password=cluster.password))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("BEGIN; CREATE TABLE held (id int); PREPARE TRANSACTION 'capy_left'")
    conn.close()
    failed = Job.create(
        id="job_" + leftover.removeprefix("capy_preview_"),
        organization=world.org.id,
        project=world.project.id,
        cluster=registered.id,
        state="failed",
        stage="restore",
        upload_key=f"imports/{world.project.id}/x/dump",
        preview_database_id=leftover,
    )
    done = sweep(control_db, Sealer(control_db.secret_key), store)
    assert leftover in done["previews_dropped"], done["errors"]
    assert not [error for error in done["errors"] if leftover in error], done["errors"]
    assert _read(cluster, "postgres", "SELECT gid FROM pg_prepared_xacts") == []
    assert failed.id
