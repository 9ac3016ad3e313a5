"""Failures classified by whose server it was: a user's source refusing connections is
retried, then fails as permanent saying it kept refusing; our own project cluster
unreachable is always transient and never shows its address, in a job or the API.
Retries run through the real stage actors on Dramatiq's StubBroker and Worker."""

from __future__ import annotations

import json
import secrets
import time

import pytest

from pipeline import jobs
from pipeline.accounts import add_cluster
from pipeline.ids import new_id
from pipeline.import_steps import ImportSteps
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Cluster, Job, Project
from pipeline.principals import Principal
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from stages.connections.pgurl import SourceURL
from stages.database.cluster import ClusterAdmin
from stages.errors import TransientCommandFailure, TransientError
from stages.tools.commands import Psql
from tests.integration.test_preflight_api import client_for, preflight
from tests.support.pgcluster import free_port
from tests.support.stubworker import stage_workers
from tests.support.world import make_world

UNAVAILABLE = "the project's database cluster is unavailable; try again shortly"


def dead_url(port: int) -> str:
    """A loopback address where nothing listens (connections are refused)."""
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def start(settings, world, url: str) -> Job:
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=True, source=SourceURL.parse(url)),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=lambda job_id, stage: None,
    )
    return job


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(autouse=True)
def forget_dead_clusters():
    """A dead cluster stays registered no longer than its test: later tests' sweeps
    would report it. Its projects and jobs go back to the live cluster they came from."""
    yield
    live = Cluster.get_or_none(Cluster.name == "local")
    for cluster in Cluster.select().where(Cluster.name.startswith("gone-")):
        if live is not None:
            Project.update(cluster=live.id).where(Project.cluster == cluster.id).execute()
            Job.update(cluster=live.id).where(Job.cluster == cluster.id).execute()
        cluster.delete_instance()


def on_dead_cluster(settings, world, port: int) -> Cluster:
    """Move the world's project to a registered cluster that has stopped answering."""
    cluster = Cluster.create(
        id=new_id("cls"),
        name=f"gone-{secrets.token_hex(3)}",
        admin_url_encrypted=Sealer(settings.secret_key).seal(dead_url(port)),
        server_major=world.cluster.server_major,
    )
    Project.update(cluster=cluster.id).where(Project.id == world.project.id).execute()
    world.project = Project.get_by_id(world.project.id)
    return cluster


@pytest.fixture
def stage_worker(control_db, store):
    """The real stage actors and steps on a StubBroker, served by a real Worker."""
    with stage_workers(control_db) as workers:

        def make(**overrides):
            settings, queue, _worker = workers.start(
                steps_for=lambda settings: ImportSteps(settings, Sealer(settings.secret_key), store),
                **overrides,
            )
            return settings, queue

        yield make


def test_a_source_refusing_connections_is_retried_then_fails_saying_it_kept_refusing(
    control_db, stage_worker
):
    settings, queue = stage_worker(max_attempts=2)
    port = free_port()
    job = start(settings, make_world(settings), f"postgres://u:pw@127.0.0.1:{port}/app?sslmode=disable")
    queue.actors["preflight"].send(job.id)
    # One retry after the backoff (CAPY_RETRY_BACKOFF_SECONDS, 1 to 2 s here), then the job gives up.
    assert wait_until(lambda: Job.get_by_id(job.id).state == "failed", timeout=60)
    failed = Job.get_by_id(job.id)
    assert failed.retry_classification == "permanent" and failed.attempts == 2
    assert failed.error == (
        "gave up on the preflight stage after 2 attempts: preflight check source_reachable failed: "
        f"the source database at 127.0.0.1:{port} kept refusing connections (connection refused); "
        "check the host and port and that the database is running"
    )
    reasons = [event.reason for event in jobs.events(job.id)]
    assert reasons[:3] == [
        "import requested",
        "preflight claimed (attempt 1 of 2)",
        "preflight will be retried: preflight check source_reachable failed: the source database at "
        f"127.0.0.1:{port} refused the connection (connection refused): nothing accepts connections there, "
        "or the server is restarting; check the host and port and that the database is running",
    ]
    assert reasons[3] == "preflight claimed (attempt 2 of 2)"
    assert reasons[4].startswith("failed (permanent): gave up on the preflight stage after 2 attempts")


def test_the_project_cluster_unreachable_is_transient_and_names_no_address():
    port = free_port()
    with pytest.raises(TransientError) as caught:
        with ClusterAdmin(dead_url(port)).connection():
            pass
    assert type(caught.value).__name__ == "ClusterUnavailable"
    assert caught.value.message == UNAVAILABLE


def test_a_job_whose_cluster_is_unreachable_is_retried_with_no_address_in_its_error(control_db, store):
    world = make_world(control_db)
    port = free_port()
    on_dead_cluster(control_db, world, port)
    job = start(control_db, world, "postgres://u:pw@127.0.0.1:5432/postgres?sslmode=disable")
    steps = ImportSteps(control_db, Sealer(control_db.secret_key), store)
    runner = Runner(control_db, steps, lambda *a, **k: None, heartbeat_seconds=1)
    with pytest.raises(TransientError):
        runner.run(job.id, "preflight")
    released = Job.get_by_id(job.id)
    assert (released.state, released.claimed_by, released.retry_classification) == (
        "running",
        None,
        "transient",
    )
    assert released.error == UNAVAILABLE
    assert str(port) not in json.dumps([e.reason for e in jobs.events(job.id)])


def test_the_preflight_endpoint_answers_503_without_the_clusters_address(control_db, store):
    world = make_world(control_db)
    port = free_port()
    on_dead_cluster(control_db, world, port)
    resp = preflight(
        client_for(control_db, store), world, {"source_url": "postgres://u:pw@db.example.com/app"}
    )
    assert resp.status_code == 503
    assert resp.json == {"error": UNAVAILABLE}
    assert str(port) not in resp.text and "127.0.0.1" not in resp.text


def test_a_tool_that_cannot_reach_our_cluster_fails_transiently_without_its_address():
    """Real psql against a refused loopback port, as a restore into the preview runs it."""
    port = free_port()
    bin_dir = f"/usr/lib/postgresql/{_local_major()}/bin"
    recorded = []
    psql = Psql(bin_dir, recorded.append)
    with pytest.raises(TransientCommandFailure) as caught:
        psql.run(
            ["--no-psqlrc", f"--dbname=host=127.0.0.1 port={port} dbname=postgres", "--command=SELECT 1"],
            what="psql restoring the plain SQL dump",
        )
    assert caught.value.message == (
        "psql restoring the plain SQL dump failed (exit code 2): the project's database cluster is unavailable; "
        "it will be retried"
    )
    [result] = recorded
    assert "Connection refused" in result.stderr_tail
    assert str(port) not in result.stderr_tail and "127.0.0.1" not in result.stderr_tail


def _local_major() -> int:
    return ClusterAdmin("postgresql://postgres@127.0.0.1:5432/postgres").server_major()


def test_registering_a_cluster_that_does_not_answer_says_why_to_the_operator(control_db):
    """The operator registering a cluster typed its URL: nothing listening there is said
    as such, with the address, not as "unavailable, try again shortly" (an import's
    stage, which a user watches, still says only that: above)."""
    port = free_port()
    with pytest.raises(TransientError) as raised:
        add_cluster(f"gone-{secrets.token_hex(3)}", dead_url(port), Sealer(control_db.secret_key))
    assert raised.value.message.startswith(f"the project cluster at 127.0.0.1:{port} refused the connection")
    assert UNAVAILABLE not in raised.value.message
