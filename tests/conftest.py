"""Session fixtures: a fresh control database, a private queue prefix, scratch sources.

Services are real (Postgres, RabbitMQ); a missing service fails the run, never skips.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest
from psycopg2 import sql

from pipeline.config import Settings
from pipeline.db import database, init_database
from pipeline.migrations import migrate
from tests.support import pg
from tests.support.broker import delete_queues

RUN_ID = secrets.token_hex(3)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on free ports, for this test run."""
    from tests.support.s3server import running_seaweedfs

    with running_seaweedfs(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory, s3) -> Settings:
    """Settings of this test run: its own control database, queue names and S3.

    Tests run in development mode (private sources allowed), with a secret key of their own,
    and keep no spare databases on the cluster (tests/e2e/conftest.py's service does, and
    the tests of spares). A stage that fails transiently is retried after 1 to 2 s, not
    5 to 10 (CAPY_RETRY_BACKOFF_SECONDS, a setting of the product: the tests check that
    the retry happens, not how long it waits).
    """
    return Settings.from_env({"CAPY_ENV": "development"}).replace(
        s3_endpoint=s3.url,
        s3_public_endpoint=s3.url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_bucket=f"capytest-{RUN_ID}",
        database_url=pg.url_for(f"capy_test_{RUN_ID}"),
        queue_prefix=f"capytest_{RUN_ID}",
        allow_private_sources=True,
        work_dir=str(tmp_path_factory.mktemp("work")),
        secret_key="test-secret-key-" + RUN_ID + "-" + secrets.token_hex(16),
        spare_databases=0,
        retry_backoff_seconds=1,
    )


@pytest.fixture(scope="session")
def control_db(base_settings):
    migrate(base_settings.database_url)
    init_database(base_settings.database_url)
    yield base_settings
    # Drop every database the run created on the local cluster, then the control db.
    if not database.is_closed():
        database.close()
    pg.drop_made_by(base_settings.database_url)
    pg.drop_spares()
    pg.drop_db(f"capy_test_{RUN_ID}")
    _delete_queues(base_settings)


@pytest.fixture
def spare_admin():
    """The cluster's admin, with no spare database on the cluster before and after the test."""
    from stages.database.cluster import ClusterAdmin

    pg.drop_spares()
    yield ClusterAdmin(pg.ADMIN_URL)
    pg.drop_spares()


@pytest.fixture
def scratch_databases():
    """A maker of database names (`capy_t_…`), each dropped after the test."""
    made: list[str] = []

    def name() -> str:
        made.append(pg.scratch_name("capy_t_db"))
        return made[-1]

    yield name
    for db in made:
        pg.drop_db(db)


@pytest.fixture
def scratch_role():
    """A login role of the test's own, dropped after it."""
    name = pg.scratch_name("capy_t_role")
    pg.admin(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


# Queue prefixes of the run: the e2e modules that start services of their own use
# their own queues (tests/e2e/test_hostile.py, test_crash_recovery.py, test_any_worker.py,
# test_contract.py, test_observability.py, test_hostile_spare_crashes.py;
# tests/integration/test_observability.py), and
# "_idle" is read by no worker (tests/integration/test_webhooks.py).
QUEUE_SUFFIXES = (
    "",
    "_prod",
    "_crash",
    "_ctldb",
    "_soak",
    "_anyworker",
    "_contract",
    "_observed",
    "_probe",
    "_idle",
    "_hspare",
)


def _delete_queues(settings: Settings) -> None:
    delete_queues(settings.broker_url, (settings.queue_prefix + suffix for suffix in QUEUE_SUFFIXES))


@pytest.fixture(scope="session")
def store(control_db):
    from pipeline.services import object_store

    store = object_store(control_db)
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def corpus_source():
    """Load a corpus database once per run: `corpus_source("pagila")` -> database name."""
    loaded: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in loaded:
            dbname = pg.create_db(f"capysrc_{name}_{RUN_ID}")
            loaded[name] = dbname
            pg.load_corpus(name, dbname)
        return loaded[name]

    yield get
    for dbname in loaded.values():
        pg.drop_db(dbname)


@pytest.fixture
def scratch_db():
    """Empty scratch databases, dropped after the test: `scratch_db("src")`."""
    made: list[str] = []

    def make(prefix: str = "capysrc") -> str:
        name = pg.create_db(pg.scratch_name(prefix))
        made.append(name)
        return name

    yield make
    for name in made:
        pg.drop_db(name)


@pytest.fixture(scope="session")
def password_source():
    """A separate cluster that checks passwords, holding a copy of chinook."""
    from tests.support.pgcluster import temporary_cluster

    with temporary_cluster() as cluster:
        subprocess.run(
            ["psql", "-X", "-q", "-d", cluster.url(), "-c", "CREATE DATABASE chinook"],
            check=True,
            capture_output=True,
        )
        pg.load_corpus("chinook", "chinook", url=cluster.url("chinook"))
        yield cluster
