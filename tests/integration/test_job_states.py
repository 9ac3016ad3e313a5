"""The job state machine against the real control database."""

import datetime as dt

import pytest

from pipeline import jobs
from pipeline.errors import Conflict
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, JobEvent
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.steps.results import FinalizeResult, PreflightResult, StageResult
from stages.connections.pgurl import SourceURL
from tests.support.world import make_world

LEASE = dt.timedelta(seconds=60)


@pytest.fixture
def world(control_db):
    return make_world(control_db)


def new_job(settings, world, wake=None, idempotency_key=None, url="postgres://u:pw@db.example.com/app"):
    woken = []
    principal = Principal(world.org.id, None, "test")
    request = ImportRequest(recreate=False, source=SourceURL.parse(url))
    job, created = start_import(
        world.project,
        principal,
        request,
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=wake or (lambda job_id, stage: woken.append((job_id, stage))),
        idempotency_key=idempotency_key,
    )
    return job, created, woken


def test_start_import_creates_a_pending_job_and_wakes_preflight(control_db, world):
    job, created, woken = new_job(control_db, world)
    assert created and woken == [(job.id, "preflight")]
    job = Job.get_by_id(job.id)
    assert (job.state, job.stage, job.attempts, job.locked_resource) == (
        "pending",
        "preflight",
        0,
        f"project:{world.project.id}",
    )
    assert (
        "u:pw@" not in job.source_url_encrypted
        and job.source_url_redacted == "postgresql://u:***@db.example.com:5432/app?sslmode=require"
    )
    assert Sealer(control_db.secret_key).open(job.source_url_encrypted).startswith("postgresql://u:pw@")


def test_second_active_import_conflicts_naming_the_first(control_db, world):
    first, _, _ = new_job(control_db, world)
    with pytest.raises(Conflict) as info:
        new_job(control_db, world)
    assert first.id in info.value.message
    jobs.fail(first.id, "test", "stop", classification="permanent")
    second, created, _ = new_job(control_db, world)
    assert created and second.id != first.id


def test_idempotency_key_returns_the_same_job(control_db, world):
    first, created, _ = new_job(control_db, world, idempotency_key="abc")
    again, created_again, woken = new_job(control_db, world, idempotency_key="abc")
    assert created and not created_again and again.id == first.id and woken == []


def test_an_unconfirmed_wake_up_leaves_the_job_pending_and_queued_for_dispatch(control_db, world):
    """The job row is the outbox (pipeline/dispatcher.py): the job is not failed, it keeps
    the project, and the sweep's reaper wakes it if the web process could not."""
    from pipeline import sweep
    from stages.errors import TransientError

    def broken(job_id, stage):
        raise TransientError("broker down")

    job, created, _ = new_job(control_db, world, wake=broken, idempotency_key="down")
    assert created and (job.state, job.error) == ("pending", None)
    assert job.progress["detail"].startswith("queued for dispatch")
    assert Job.get_by_id(job.id).progress == job.progress
    with pytest.raises(Conflict):
        new_job(control_db, world)
    replayed, created_again, _ = new_job(control_db, world, idempotency_key="down")
    assert replayed.id == job.id and not created_again
    later = jobs.utcnow() + dt.timedelta(minutes=2)
    assert job.id in [stuck.id for stuck, _ in sweep.stuck_jobs(control_db, later)]


def test_claim_is_exclusive_and_counts_attempts(control_db, world):
    job, _, _ = new_job(control_db, world)
    claimed = jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    assert claimed.state == "running" and claimed.claimed_by == "w1" and claimed.attempts == 1
    assert claimed.started_at is not None and claimed.claimed_at is not None
    assert jobs.claim(job.id, "preflight", "w2", lease=LEASE) is None
    assert jobs.claim(job.id, "fetch", "w2", lease=LEASE) is None


def test_stale_claim_is_taken_over(control_db, world):
    job, _, _ = new_job(control_db, world)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    Job.update(heartbeat_at=jobs.utcnow() - dt.timedelta(minutes=5)).where(Job.id == job.id).execute()
    taken = jobs.claim(job.id, "preflight", "w2", lease=LEASE)
    assert taken.claimed_by == "w2" and taken.attempts == 2
    assert "taking over the stale claim of w1" in jobs.events(job.id)[-1].reason
    assert not jobs.heartbeat(job.id, "w1")
    assert jobs.heartbeat(job.id, "w2")


def test_max_attempts_stops_claims(control_db, world):
    job, _, _ = new_job(control_db, world)
    Job.update(attempts=job.max_attempts).where(Job.id == job.id).execute()
    assert jobs.claim(job.id, "preflight", "w1", lease=LEASE) is None


def test_advance_and_complete_are_guarded_and_recorded(control_db, world):
    job, _, _ = new_job(control_db, world)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    assert jobs.advance(job.id, "w2", "preflight", facts=StageResult()) is None  # not the holder
    advanced = jobs.advance(job.id, "w1", "preflight", facts=PreflightResult(source_address="192.0.2.1"))
    assert (advanced.stage, advanced.claimed_by, advanced.attempts, advanced.facts.stored()) == (
        "fetch",
        None,
        0,
        {"source_address": "192.0.2.1"},
    )
    assert jobs.advance(job.id, "w1", "preflight", facts=StageResult()) is None  # duplicate message
    Job.update(stage="finalize").where(Job.id == job.id).execute()
    jobs.claim(job.id, "finalize", "w1", lease=LEASE)
    done = jobs.complete(
        job.id,
        "w1",
        "finalize",
        facts=FinalizeResult(replaced_database="db_replaced"),
        progress={"phase": "completed"},
    )
    assert done.state == "completed" and done.completed_at
    assert done.facts.stored() == {"source_address": "192.0.2.1", "replaced_database": "db_replaced"}
    assert jobs.fail(job.id, "w1", "late", classification="permanent") is None
    reasons = [e.reason for e in JobEvent.select().where(JobEvent.job == job.id).order_by(JobEvent.id)]
    assert reasons == [
        "import requested",
        "preflight claimed (attempt 1 of 3)",
        "preflight done",
        "finalize claimed (attempt 1 of 3)",
        "import completed",
    ]


def test_release_keeps_the_job_running_for_a_retry(control_db, world):
    job, _, _ = new_job(control_db, world)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    released = jobs.release(job.id, "w1", "source timed out")
    assert (released.state, released.claimed_by, released.error, released.retry_classification) == (
        "running",
        None,
        "source timed out",
        "transient",
    )
    again = jobs.claim(job.id, "preflight", "w2", lease=LEASE)
    assert again.attempts == 2


def test_a_job_that_gave_up_does_not_promise_another_retry(control_db, world):
    from pipeline.runner import Runner

    job, _, _ = new_job(control_db, world)
    Job.update(max_attempts=1).where(Job.id == job.id).execute()
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    jobs.release(job.id, "w1", "an internal error interrupted the preflight stage; it will be retried")

    class NoSteps:
        def cleanup(self, job, *, succeeded):
            pass

    Runner(control_db, NoSteps(), lambda *a, **k: None).exhausted(job.id, "preflight")
    failed = Job.get_by_id(job.id)
    assert failed.state == "failed" and failed.error == (
        "gave up on the preflight stage after 1 attempts; last error: an internal error interrupted the preflight stage"
    )


def test_a_message_out_of_retries_wakes_a_job_with_attempts_left_instead_of_failing_it(control_db, world):
    """Its runs failed before they could claim (the control database was away): none
    of the job's attempts were used, so the job is woken again, not failed with no
    error to show."""
    from pipeline.runner import Runner

    job, _, _ = new_job(control_db, world)
    woken = []

    class NoSteps:
        def cleanup(self, job, *, succeeded):
            raise AssertionError("nothing to clean up: the job goes on")

    Runner(control_db, NoSteps(), lambda *a, **k: woken.append((a, k))).exhausted(job.id, "preflight")
    after = Job.get_by_id(job.id)
    assert after.state == job.state and after.error is None
    assert woken == [((job.id, "preflight"), {"delay_ms": control_db.lease_seconds * 1000})]


def test_a_job_whose_workers_kept_dying_gives_up_saying_so(control_db, world):
    from pipeline.runner import Runner

    job, _, _ = new_job(control_db, world)
    Job.update(max_attempts=1).where(Job.id == job.id).execute()
    jobs.claim(job.id, "preflight", "host:4242:1", lease=LEASE)
    Job.update(heartbeat_at=jobs.utcnow() - dt.timedelta(hours=1)).where(Job.id == job.id).execute()

    class NoSteps:
        def cleanup(self, job, *, succeeded):
            pass

    Runner(control_db, NoSteps(), lambda *a, **k: None).exhausted(job.id, "preflight")
    assert Job.get_by_id(job.id).error == (
        "gave up on the preflight stage after 1 attempts; last error: the worker running it (host:4242:1) "
        "stopped heartbeating: it was killed, ran out of memory or lost its host"
    )
