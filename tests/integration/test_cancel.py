"""Cancelling imports: pending ones never start; running ones stop their tools within
seconds, drop their preview and restore role, and free the project."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import threading
import time

import pytest

from pipeline import accounts, apikeys, cancellation, jobs
from pipeline.errors import Conflict, NotFound
from pipeline.import_steps import ImportSteps, restore_role_name
from pipeline.imports import ImportRequest, start_import
from pipeline.models import AuditEvent, Job
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.steps.results import StageResult
from stages.connections.pgurl import SourceURL
from stages.database.cluster import ClusterAdmin
from tests.support import pg
from tests.support.api import api_client
from tests.support.imports import create_upload
from tests.support.inline import InlineQueue
from tests.support.uploading import upload_file
from tests.support.world import World, make_world

SOURCE = "postgres://u:pw@db.example.com/app"


@pytest.fixture
def world(control_db):
    return make_world(control_db)


LEASE = dt.timedelta(seconds=90)


def steps(settings, store) -> ImportSteps:
    return ImportSteps(settings, Sealer(settings.secret_key), store)


def cancel(settings, store, job_id: str, actor: str = "operator:tester") -> cancellation.CancelOutcome:
    helper = steps(settings, store)
    return cancellation.request_cancel(
        job_id, actor, lease=LEASE, cleanup=lambda job: helper.cleanup(job, succeeded=False)
    )


def start(settings, world: World, wake, request: ImportRequest | None = None) -> Job:
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        request or ImportRequest(recreate=False, source=SourceURL.parse(SOURCE)),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=wake,
    )
    return job


def reasons(job_id: str) -> list[str]:
    return [event.reason for event in jobs.events(job_id)]


def audit_actions(job_id: str) -> list[tuple[str, str, str]]:
    return [
        (event.action, event.actor, event.details["outcome"])
        for event in AuditEvent.select().where(AuditEvent.target_id == job_id).order_by(AuditEvent.created_at)
        if event.action == cancellation.IMPORT_CANCELLED
    ]


def test_a_cancelled_pending_job_never_starts(control_db, store, world):
    queue = InlineQueue(control_db)
    job = start(control_db, world, queue.wake)
    outcome = cancel(control_db, store, job.id)
    assert outcome.done
    cancelled = Job.get_by_id(job.id)
    assert (cancelled.state, cancelled.retry_classification, cancelled.locked_resource) == (
        "cancelled",
        "permanent",
        None,
    )
    assert cancelled.error == "cancelled by operator:tester; the project's database was not changed"
    assert cancelled.completed_at is not None and cancelled.cancel_requested_by == "operator:tester"
    assert cancelled.progress == {"stage": "preflight", "phase": "cancelled"}
    # The preflight message still arrives, finds the job final and does nothing.
    assert list(queue.woken) == [(job.id, "preflight")]
    queue.drain()
    after = Job.get_by_id(job.id)
    assert (after.state, after.attempts, after.started_at) == ("cancelled", 0, None)
    assert reasons(job.id) == ["import requested", "cancelled by operator:tester at the preflight stage"]
    assert audit_actions(job.id) == [("project.import_cancelled", "operator:tester", "cancelled")]
    # The project is free: a new import starts.
    start(control_db, world, lambda job_id, stage: None)


def test_a_finished_job_cannot_be_cancelled(control_db, store, world):
    job = start(control_db, world, lambda job_id, stage: None)
    Job.update(stage="finalize").where(Job.id == job.id).execute()
    jobs.claim(job.id, "finalize", "w1", lease=LEASE)
    jobs.complete(job.id, "w1", "finalize", facts=StageResult(), progress={"phase": "completed"})
    with pytest.raises(Conflict) as info:
        cancel(control_db, store, job.id)
    assert info.value.message == (
        f"job {job.id} is already completed; only a pending or running import can be cancelled"
    )
    with pytest.raises(NotFound):
        cancel(control_db, store, "job_doesnotexist")


def test_a_stale_claim_is_cancelled_at_once(control_db, store, world):
    job = start(control_db, world, lambda job_id, stage: None)
    jobs.claim(job.id, "preflight", "dead-worker", lease=LEASE)
    Job.update(heartbeat_at=jobs.utcnow() - dt.timedelta(minutes=10)).where(Job.id == job.id).execute()
    outcome = cancel(control_db, store, job.id)
    assert outcome.done and outcome.job.state == "cancelled" and outcome.job.claimed_by is None
    assert reasons(job.id)[-1] == (
        "cancelled by operator:tester at the preflight stage (its stale claim by dead-worker was dropped)"
    )


def tool_groups(marker_path: str) -> set[int]:
    """Process groups of running psql processes that read `marker_path`."""
    groups = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
            if args and args[0].endswith(b"psql") and any(marker_path.encode() in a for a in args):
                groups.add(os.getpgid(int(pid)))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return groups


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def sessions(marker: str) -> list[tuple]:
    return pg.admin(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", (f"%{marker}%",)
    )


def run_until(queue: InlineQueue, stage: str) -> None:
    """Run the woken stages in order until `stage` is the next one."""
    while queue.woken[0][1] != stage:
        job_id, woken = queue.woken.popleft()
        queue.runner.run(job_id, woken)


def test_cancelling_a_running_restore_stops_psql_and_drops_the_preview(control_db, store, world):
    marker = "capy-cancel-" + secrets.token_hex(4)
    upload = create_upload(store, world)
    upload_file(upload, f"CREATE TABLE t (id int);\nSELECT pg_sleep(60), '{marker}';\n".encode())
    queue = InlineQueue(control_db)
    job = start(control_db, world, queue.wake, ImportRequest(recreate=False, upload_key=upload["object_key"]))
    run_until(queue, "restore")
    queue.woken.popleft()
    failures: list[BaseException] = []

    def restore() -> None:
        try:
            queue.runner.run(job.id, "restore")
        except BaseException as err:  # reported by the test, not lost in the thread
            failures.append(err)

    worker = threading.Thread(target=restore)
    worker.start()
    until = time.monotonic() + 30
    while not sessions(marker):
        assert time.monotonic() < until and worker.is_alive(), "the restore never reached pg_sleep"
        time.sleep(0.1)
    # psql reads the script streamed into a pipe in the restore stage's own folder.
    job_dir = os.path.join(control_db.work_dir, job.id)
    groups = tool_groups(job_dir + "/restore-")
    assert len(groups) == 1

    began = time.monotonic()
    outcome = cancel(control_db, store, job.id, actor="api_key:key_abc")
    assert not outcome.done
    assert (outcome.job.state, outcome.job.stage) == ("running", "restore")
    assert outcome.job.cancel_requested_at is not None
    worker.join(20)
    assert not worker.is_alive() and failures == []
    assert time.monotonic() - began < 10
    assert not any(group_alive(pgid) for pgid in groups)
    assert sessions(marker) == []

    done = Job.get_by_id(job.id)
    assert (done.state, done.retry_classification, done.locked_resource, done.claimed_by) == (
        "cancelled",
        "permanent",
        None,
        None,
    )
    assert done.error == (
        "cancelled by api_key:key_abc during the restore stage; the project's database was not changed"
    )
    assert done.last_stderr.endswith(
        "stopped: psql restoring the plain SQL dump was stopped: cancelled by api_key:key_abc"
    )
    assert not pg.database_exists(done.preview_database_id)
    assert not ClusterAdmin(pg.ADMIN_URL).role_exists(restore_role_name(done))
    assert not os.path.exists(job_dir)
    assert pg.row_counts(world.project.database_name) == {}
    assert reasons(job.id)[-2:] == [
        f"cancel requested by api_key:key_abc; {outcome.job.claimed_by} stops the restore stage",
        "cancelled by api_key:key_abc: the restore stage was stopped",
    ]
    assert audit_actions(job.id) == [("project.import_cancelled", "api_key:key_abc", "requested")]
    start(control_db, world, lambda job_id, stage: None)  # the project is free


class CancelAt(ImportSteps):
    """Finalize with a cancel arriving at a chosen step: at the hand-over (before the
    swap) or as the swap begins."""

    def __init__(self, *args, when: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.when = when

    def _admin(self, job):
        admin = super()._admin(job)
        steps, when = self, self.when

        class Interrupted(ClusterAdmin):
            def hand_over(self, *args, **kwargs):
                if when == "hand_over":
                    steps.cancel_now(job.id)
                return super().hand_over(*args, **kwargs)

            def swap(self, **kwargs):
                if when == "swap":
                    steps.cancel_now(job.id)
                return super().swap(**kwargs)

        admin.__class__ = Interrupted
        return admin

    def cancel_now(self, job_id):
        outcome = cancellation.request_cancel(
            job_id, "operator:late", lease=LEASE, cleanup=lambda job: self.cleanup(job, succeeded=False)
        )
        assert not outcome.done


@pytest.mark.parametrize("when", ["hand_over", "swap"])
def test_a_cancel_during_finalize_never_half_swaps(control_db, store, world, corpus_source, when):
    source = corpus_source("chinook")
    queue = InlineQueue(control_db)
    queue.runner.steps = CancelAt(control_db, Sealer(control_db.secret_key), store, when=when)
    job = start(
        control_db,
        world,
        queue.wake,
        ImportRequest(recreate=False, source=SourceURL.parse_source(pg.url_for(source, sslmode="disable"))),
    )
    queue.drain()
    done = Job.get_by_id(job.id)
    live = world.project.database_name
    if when == "hand_over":
        assert done.state == "cancelled", done.error
        assert done.error.startswith("cancelled by operator:late during the finalize stage")
        assert pg.row_counts(live) == {}
        assert not pg.database_exists(done.preview_database_id)
    else:
        assert done.state == "completed", done.error
        assert pg.row_counts(live) == pg.row_counts(source)
        assert reasons(job.id)[-1] == (
            "the cancel requested by operator:late came after the swap had begun; the import completed "
            "instead (a swap is never interrupted)"
        )
    # Either way the live database accepts connections.
    assert pg.admin("SELECT datallowconn FROM pg_database WHERE datname = %s", (live,)) == [(True,)]


@pytest.fixture
def client(control_db, store):
    return api_client(control_db, store)


def post_cancel(client, job_id: str, key: str):
    return client.simulate_post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {key}"})


def test_cancel_over_http(control_db, store, world, client):
    job = start(control_db, world, lambda job_id, stage: None)
    reader = apikeys.create_key(world.org, world.project, name="reader", scopes=["jobs:read"]).plaintext
    refused = post_cancel(client, job.id, reader)
    assert refused.status_code == 403 and "projects:write" in refused.json["error"]
    stranger = make_world(control_db)
    sibling = accounts.create_project(
        world.org, "sibling", Sealer(control_db.secret_key), cluster_id=world.cluster.id
    )
    sibling_key = apikeys.create_key(world.org, sibling, name="sibling").plaintext
    for key in (stranger.key, sibling_key):  # another organization; another project's key
        hidden = post_cancel(client, job.id, key)
        assert (hidden.status_code, hidden.json) == (404, {"error": f"job {job.id} does not exist"})
    assert Job.get_by_id(job.id).state == "pending"

    resp = post_cancel(client, job.id, world.key)
    assert resp.status_code == 202, resp.text
    body = resp.json["job"]
    assert (body["state"], body["retry_classification"], body["locked_resource"]) == (
        "cancelled",
        "permanent",
        None,
    )
    assert body["error"].startswith("cancelled by api_key:") and body["cancel_requested_at"]
    assert resp.headers["Location"] == f"/v1/jobs/{job.id}"

    again = post_cancel(client, job.id, world.key)
    assert again.status_code == 409
    assert again.json == {
        "error": f"job {job.id} is already cancelled; only a pending or running import can be cancelled"
    }
    assert post_cancel(client, "job_nosuchjob", world.key).status_code == 404
    assert post_cancel(client, "job_" + "x" * 100, world.key).status_code == 400

    events = client.simulate_get(
        f"/v1/projects/{world.project.id}/audit-events", headers={"X-API-Key": world.key}
    ).json["audit_events"]
    assert events[0]["action"] == "project.import_cancelled" and events[0]["target_id"] == job.id
    assert json.dumps(events[0]["details"]) and events[0]["details"]["outcome"] == "cancelled"


def test_cancel_of_a_running_job_over_http_answers_the_job_with_its_marker(control_db, store, world, client):
    job = start(control_db, world, lambda job_id, stage: None)
    jobs.claim(job.id, "preflight", "busy-worker", lease=LEASE)
    resp = post_cancel(client, job.id, world.key)
    assert resp.status_code == 202
    body = resp.json["job"]
    assert (body["state"], body["claimed_by"]) == ("running", "busy-worker") and body["cancel_requested_at"]
    # The worker holding it ends it (here by hand: its stage is not really running).
    assert cancellation.finish(job.id, "busy-worker").state == "cancelled"


def test_a_cancel_during_preflight_interrupts_the_source_session(control_db, store, world):
    """The worker's preflight waits on a source that stopped answering: a cancel ends
    that wait within seconds (the watchdog shuts the socket down), not at the
    preflight deadline, and the job ends cancelled, not failed by the timeout."""
    from tests.support.muteproxy import mute_after_login

    settings = control_db.replace(preflight_deadline_seconds=60)
    with mute_after_login() as proxy:
        source = SourceURL.parse(f"postgres://postgres@127.0.0.1:{proxy.port}/postgres?sslmode=disable")
        queue = InlineQueue(settings)
        job = start(settings, world, queue.wake, ImportRequest(recreate=False, source=source))
        queue.woken.popleft()
        failures: list[BaseException] = []

        def preflight() -> None:
            try:
                queue.runner.run(job.id, "preflight")
            except BaseException as err:  # reported by the test, not lost in the thread
                failures.append(err)

        worker = threading.Thread(target=preflight)
        worker.start()
        assert proxy.held.wait(30), "the preflight never reached the source"
        began = time.monotonic()
        cancel(settings, store, job.id, actor="api_key:key_abc")
        worker.join(30)
        assert not worker.is_alive() and failures == []
        assert time.monotonic() - began < 15  # the preflight deadline is 60 s
    done = Job.get_by_id(job.id)
    assert (done.state, done.error) == (
        "cancelled",
        "cancelled by api_key:key_abc during the preflight stage; the project's database was not changed",
    )
