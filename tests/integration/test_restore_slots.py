"""Restore slots: a per-cluster limit on concurrent restores (real control database).

Each test registers a cluster of its own (the local server under another name), so its
limits and slots touch no other test's jobs."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pipeline import accounts, cancellation, jobs, restore_slots
from pipeline.db import database
from pipeline.errors import InvalidRequest, NotFound
from pipeline.import_steps import StageContext
from pipeline.imports import ImportRequest, start_import
from pipeline.models import ACTIVE_STATES, Cluster, Job, RestoreSlot
from pipeline.principals import Principal
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from pipeline.serialize import job_json
from pipeline.steps.results import StageResult
from stages.connections.pgurl import SourceURL
from tests.support import pg
from tests.support.inline import InlineQueue

LEASE = dt.timedelta(seconds=90)
WAITING = "waiting for a restore slot on the target cluster"


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Wait for a condition another thread brings about (not a timing assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def settings(control_db):
    return control_db.replace(cluster_restore_limit=2, lease_seconds=int(LEASE.total_seconds()))


@pytest.fixture
def cluster(settings):
    return accounts.add_cluster("slots-" + secrets.token_hex(4), pg.ADMIN_URL, Sealer(settings.secret_key))


@pytest.fixture
def made(settings):
    """Jobs the test made; those still active at its end are failed (nothing waits on them)."""
    made: list[str] = []
    yield made
    for job in Job.select().where(Job.id.in_(made) & Job.state.in_(ACTIVE_STATES)):
        jobs.fail(job.id, "test", "test over", classification="permanent")


def new_job(settings, cluster: Cluster, made: list[str]) -> Job:
    """A pending import of a project of its own (organization too: no fair share) on `cluster`."""
    sealer = Sealer(settings.secret_key)
    org = accounts.create_organization("slots")
    project = accounts.create_project(org, "slots", sealer, cluster_id=cluster.id)
    job, _ = start_import(
        project,
        Principal(org.id, None, "test"),
        ImportRequest(recreate=False, source=SourceURL.parse("postgres://u:pw@db.example.com/app")),
        settings=settings,
        sealer=sealer,
        wake=lambda job_id, stage: None,
    )
    made.append(job.id)
    return job


def at_restore(job: Job) -> Job:
    """Put the job at its restore stage, unclaimed, as the fetch stage's commit leaves it."""
    Job.update(stage="restore", state="running").where(Job.id == job.id).execute()
    return Job.get_by_id(job.id)


def restoring(settings, cluster: Cluster, made: list[str], actor: str) -> Job:
    """A job whose restore stage `actor` has claimed."""
    job = at_restore(new_job(settings, cluster, made))
    claimed = jobs.claim(job.id, "restore", actor, lease=LEASE)
    assert claimed is not None
    return claimed


def acquire(settings, job: Job, actor: str) -> tuple[bool, restore_slots.SlotUse]:
    return restore_slots.try_acquire(job.id, actor, default_limit=settings.cluster_restore_limit, lease=LEASE)


def reasons(job: Job) -> list[str]:
    return [event.reason for event in jobs.events(job.id)]


def test_slots_are_taken_up_to_the_limit_then_refused(settings, cluster, made):
    a, b, c = (restoring(settings, cluster, made, f"w{i}") for i in range(3))
    assert acquire(settings, a, "w0") == (True, restore_slots.SlotUse(cluster.id, 1, 2))
    assert acquire(settings, b, "w1") == (True, restore_slots.SlotUse(cluster.id, 2, 2))
    assert acquire(settings, c, "w2") == (False, restore_slots.SlotUse(cluster.id, 2, 2))
    # Taking it again under the same claim counts it once.
    assert acquire(settings, a, "w0") == (True, restore_slots.SlotUse(cluster.id, 2, 2))
    assert f"restore slot taken on cluster {cluster.id} (1 of 2 in use)" in reasons(a)
    assert restore_slots.in_use(cluster, default_limit=2, lease=LEASE).in_use == 2
    # Only the claim that holds the restore stage may take a slot.
    with pytest.raises(jobs.ClaimLost):
        acquire(settings, c, "someone-else")


def test_a_clusters_own_limit_overrides_the_default(settings, cluster, made):
    other = accounts.add_cluster("slots-" + secrets.token_hex(4), pg.ADMIN_URL, Sealer(settings.secret_key))
    a, b = (restoring(settings, cluster, made, f"w{i}") for i in range(2))
    elsewhere = restoring(settings, other, made, "w9")
    restore_slots.set_cluster_limit(cluster.id, 1)
    assert acquire(settings, a, "w0")[0]
    assert acquire(settings, b, "w1") == (False, restore_slots.SlotUse(cluster.id, 1, 1))
    # Another cluster follows the default, and is not held up.
    assert acquire(settings, elsewhere, "w9") == (True, restore_slots.SlotUse(other.id, 1, 2))
    # Back to the default (2): the second restore gets its slot.
    assert restore_slots.set_cluster_limit(cluster.id, None).restore_limit is None
    assert acquire(settings, b, "w1") == (True, restore_slots.SlotUse(cluster.id, 2, 2))
    with pytest.raises(InvalidRequest):
        restore_slots.set_cluster_limit(cluster.id, 0)
    with pytest.raises(NotFound):
        restore_slots.set_cluster_limit("cls_missing", 3)


def _advance(job: Job, actor: str) -> None:
    jobs.advance(job.id, actor, "restore", facts=StageResult())


def _release(job: Job, actor: str) -> None:
    jobs.release(job.id, actor, "the target was busy; it will be retried")


def _fail(job: Job, actor: str) -> None:
    jobs.fail(job.id, actor, "the dump is broken", classification="permanent", holder=actor)


def _cancel(job: Job, actor: str) -> None:
    outcome = cancellation.request_cancel(job.id, "tester", lease=LEASE, cleanup=lambda job: None)
    assert not outcome.done  # the holder is alive: it is asked to stop, and does
    assert cancellation.finish(job.id, actor).state == "cancelled"


@pytest.mark.parametrize(
    "end", [_advance, _release, _fail, _cancel], ids=["done", "retried", "failed", "cancelled"]
)
def test_a_slot_ends_with_the_claim_of_the_restore_stage(settings, cluster, made, end):
    restore_slots.set_cluster_limit(cluster.id, 1)
    holder = restoring(settings, cluster, made, "holder")
    waiter = restoring(settings, cluster, made, "waiter")
    assert acquire(settings, holder, "holder")[0]
    assert not acquire(settings, waiter, "waiter")[0]
    end(holder, "holder")  # no release: the claim's end is the slot's
    assert acquire(settings, waiter, "waiter") == (True, restore_slots.SlotUse(cluster.id, 1, 1))
    # The ended claim's row is gone too (deleted by the acquisition, under the cluster's lock).
    assert RestoreSlot.get_or_none(RestoreSlot.job == holder.id) is None


def test_waiting_restores_take_free_slots_in_the_order_they_began_to_wait(settings, cluster, made):
    restore_slots.set_cluster_limit(cluster.id, 1)
    holder, first, second, stale = (restoring(settings, cluster, made, f"w{i}") for i in range(4))
    assert acquire(settings, holder, "w0")[0]
    assert acquire(settings, first, "w1") == (False, restore_slots.SlotUse(cluster.id, 1, 1, ahead=0))
    assert acquire(settings, second, "w2") == (False, restore_slots.SlotUse(cluster.id, 1, 1, ahead=1))
    _advance(holder, "w0")
    # The slot is free, but the first in line gets it, however fast the second asks.
    assert acquire(settings, second, "w2") == (False, restore_slots.SlotUse(cluster.id, 0, 1, ahead=1))
    assert acquire(settings, first, "w1") == (True, restore_slots.SlotUse(cluster.id, 1, 1))
    assert acquire(settings, stale, "w3") == (False, restore_slots.SlotUse(cluster.id, 1, 1, ahead=1))
    _fail(first, "w1")
    # A waiter whose worker died (stale heartbeat) holds no place.
    Job.update(heartbeat_at=jobs.utcnow() - LEASE - dt.timedelta(seconds=1)).where(
        Job.id == second.id
    ).execute()
    assert acquire(settings, stale, "w3") == (True, restore_slots.SlotUse(cluster.id, 1, 1))


def test_a_restore_handed_back_keeps_its_place_in_the_queue(settings, cluster, made):
    restore_slots.set_cluster_limit(cluster.id, 1)
    holder = restoring(settings, cluster, made, "holder")
    assert acquire(settings, holder, "holder")[0]
    early = restoring(settings, cluster, made, "w1")
    with pytest.raises(restore_slots.StillWaiting):
        restore_slots.wait_for_restore_slot(StageContext(early, "w1"), settings, window=0)
    queued = RestoreSlot.get_by_id(early.id).queued_at
    assert jobs.hand_back(early.id, "w1", "restore handed back") is not None
    late = restoring(settings, cluster, made, "w2")
    assert not acquire(settings, late, "w2")[0]  # queued while the early one was between workers
    again = jobs.claim(early.id, "restore", "w3", lease=LEASE)
    assert again is not None and again.attempts == 1
    with pytest.raises(restore_slots.StillWaiting):
        restore_slots.wait_for_restore_slot(StageContext(again, "w3"), settings, window=0)
    assert RestoreSlot.get_by_id(early.id).queued_at == queued
    assert Job.get_by_id(early.id).progress["restore_slot_queued_ahead"] == 0
    _advance(holder, "holder")
    assert acquire(settings, late, "w2") == (False, restore_slots.SlotUse(cluster.id, 0, 1, ahead=1))
    assert acquire(settings, again, "w3")[0]


def test_a_dead_holders_slot_is_free_once_its_heartbeat_is_stale(settings, cluster, made):
    restore_slots.set_cluster_limit(cluster.id, 1)
    dead = restoring(settings, cluster, made, "killed-worker")
    waiter = restoring(settings, cluster, made, "waiter")
    assert acquire(settings, dead, "killed-worker")[0]
    assert not acquire(settings, waiter, "waiter")[0]
    # SIGKILLed: its heartbeat stops; one lease later its claim, and its slot, are up for grabs.
    Job.update(heartbeat_at=jobs.utcnow() - LEASE - dt.timedelta(seconds=1)).where(
        Job.id == dead.id
    ).execute()
    assert acquire(settings, waiter, "waiter") == (True, restore_slots.SlotUse(cluster.id, 1, 1))
    # Only stale, not ended (were it alive after all, its claim would still be its own).
    assert RestoreSlot.get_or_none(RestoreSlot.job == dead.id) is not None
    # Its job is taken over by another worker, whose claim must wait for a slot of its own.
    taken = jobs.claim(dead.id, "restore", "new-worker", lease=LEASE)
    assert taken is not None and taken.attempts == 2
    assert acquire(settings, taken, "new-worker") == (False, restore_slots.SlotUse(cluster.id, 1, 1))
    # The killed worker's slot is gone; the job's row is now the new claim's place in the queue.
    row = RestoreSlot.get_by_id(dead.id)
    assert (row.claimed_by, row.acquired_at) == ("new-worker", None)
    # The killed worker's claim is gone: it can take nothing.
    with pytest.raises(jobs.ClaimLost):
        acquire(settings, dead, "killed-worker")


def take_together(settings, contenders: list[tuple[Job, str]]) -> dict[str, bool]:
    """Each contender tries for a slot in a thread of its own, all released at one instant."""
    barrier = threading.Barrier(len(contenders))
    outcome: dict[str, bool] = {}

    def take(job: Job, actor: str) -> None:
        try:
            barrier.wait()
            outcome[actor] = acquire(settings, job, actor)[0]
        finally:
            database.close()  # the thread's own connection

    threads = [threading.Thread(target=take, args=pair) for pair in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcome


def test_concurrent_acquirers_take_exactly_the_limit(settings, cluster, made):
    contenders = [(restoring(settings, cluster, made, f"w{i}"), f"w{i}") for i in range(6)]
    for _round in range(5):
        outcome = take_together(settings, contenders)
        assert len(outcome) == 6
        assert sorted(outcome.values()) == [False] * 4 + [True] * 2, outcome
        assert restore_slots.in_use(cluster, default_limit=2, lease=LEASE).in_use == 2
        for job, actor in contenders:
            restore_slots.release(job.id, actor)


def test_a_waiting_restore_shows_why_and_starts_as_soon_as_a_slot_frees(settings, cluster, made):
    restore_slots.set_cluster_limit(cluster.id, 1)
    holder = restoring(settings, cluster, made, "holder")
    waiter = restoring(settings, cluster, made, "waiter")
    assert acquire(settings, holder, "holder")[0]
    got: dict[str, Any] = {}

    def wait() -> None:
        try:
            got["use"] = restore_slots.wait_for_restore_slot(
                StageContext(waiter, "waiter"), settings, poll=0.05
            )
        except BaseException as err:  # pragma: no cover - reported below
            got["error"] = err
        finally:
            database.close()

    thread = threading.Thread(target=wait)
    thread.start()
    shown = wait_until(
        lambda: Job.get_by_id(waiter.id).progress.get("phase", "").startswith(WAITING), "the waiting phase"
    )
    view = job_json(Job.get_by_id(waiter.id))  # what GET /v1/jobs/{id} answers
    assert view["progress"]["phase"] == f"{WAITING} (1 of 1 in use)", shown
    assert (view["progress"]["restore_slots_in_use"], view["progress"]["restore_slot_limit"]) == (1, 1)
    assert "starts as soon as" in view["progress"]["detail"]
    assert (view["state"], view["stage"], view["attempts"], view["error"]) == ("running", "restore", 1, None)
    assert thread.is_alive()
    jobs.advance(holder.id, "holder", "restore", facts=StageResult())  # the holder's restore is done
    thread.join(60)
    assert got == {"use": restore_slots.SlotUse(cluster.id, 1, 1)}
    history = reasons(waiter)
    waited = history.index(f"{WAITING} {cluster.id} (1 of 1 in use)")
    assert history.index(f"restore slot taken on cluster {cluster.id} (1 of 1 in use)") > waited
    assert Job.get_by_id(waiter.id).attempts == 1


def test_restore_slot_gives_the_slot_back_when_its_block_ends(settings, cluster, made):
    job = restoring(settings, cluster, made, "w1")
    context = StageContext(job, "w1")
    with restore_slots.restore_slot(context, settings) as use:
        assert use == restore_slots.SlotUse(cluster.id, 1, 2)
        assert RestoreSlot.get_or_none(RestoreSlot.job == job.id) is not None
    assert RestoreSlot.get_or_none(RestoreSlot.job == job.id) is None
    assert reasons(job)[-1] == "restore slot released"
    with pytest.raises(RuntimeError), restore_slots.restore_slot(context, settings):
        raise RuntimeError("the restore failed")
    assert RestoreSlot.get_or_none(RestoreSlot.job == job.id) is None


class SlotSteps:
    """Steps whose restore only waits for its slot (a real wait, real claim and heartbeat)."""

    def __init__(self, settings, **wait: Any) -> None:
        self.settings = settings
        self.wait = wait
        self.claims: list[int] = []

    def run(self, stage: str, context: StageContext) -> dict[str, Any]:
        assert stage == "restore"
        self.claims.append(context.job.attempts)
        restore_slots.wait_for_restore_slot(context, self.settings, **self.wait)
        return {}

    def take_over(self, job: Job) -> None:
        pass

    def cleanup(self, job: Job, *, succeeded: bool) -> None:
        pass

    def stop_sessions(self, job: Job) -> None:
        pass


def test_a_restore_that_waited_its_window_is_handed_back_without_using_an_attempt(settings, cluster, made):
    restore_slots.set_cluster_limit(cluster.id, 1)
    holder = restoring(settings, cluster, made, "holder")
    assert acquire(settings, holder, "holder")[0]
    waiter = at_restore(new_job(settings, cluster, made))
    woken: list[tuple[str, str, int]] = []
    steps = SlotSteps(settings, window=0)
    runner = Runner(
        settings, steps, lambda job_id, stage, delay_ms=0: woken.append((job_id, stage, delay_ms))
    )

    runner.run(waiter.id, "restore")
    back = Job.get_by_id(waiter.id)
    assert woken == [(waiter.id, "restore", 0)]
    assert (back.stage, back.attempts, back.claimed_by, back.error) == ("restore", 0, None, None)
    assert back.progress["phase"] == f"{WAITING} (1 of 1 in use)"
    assert reasons(waiter)[-1].startswith("restore handed back to the queue: the restore waited for a slot")

    jobs.fail(holder.id, "holder", "gone", classification="permanent", holder="holder")
    runner.run(waiter.id, "restore")
    done = Job.get_by_id(waiter.id)
    assert (done.stage, done.claimed_by) == ("finalize", None)
    assert steps.claims == [1, 1]  # each claim was the job's first attempt


def test_a_waiting_restore_can_be_cancelled(settings, cluster, made):
    restore_slots.set_cluster_limit(cluster.id, 1)
    holder = restoring(settings, cluster, made, "holder")
    assert acquire(settings, holder, "holder")[0]
    waiter = at_restore(new_job(settings, cluster, made))
    runner = Runner(
        settings, SlotSteps(settings, poll=0.05), lambda *args, **kwargs: None, heartbeat_seconds=0.5
    )

    def run() -> None:
        try:
            runner.run(waiter.id, "restore")
        finally:
            database.close()

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(
        lambda: Job.get_by_id(waiter.id).progress.get("phase", "").startswith(WAITING), "the waiting phase"
    )
    outcome = cancellation.request_cancel(waiter.id, "tester", lease=LEASE, cleanup=lambda job: None)
    assert not outcome.done
    thread.join(60)
    assert not thread.is_alive()
    ended = Job.get_by_id(waiter.id)
    assert (ended.state, ended.claimed_by) == ("cancelled", None)
    assert ended.error.startswith("cancelled by tester during the restore stage")
    # It holds no place in the queue any more; the holder kept its slot all along.
    use = restore_slots.in_use(Cluster.get_by_id(cluster.id), default_limit=2, lease=LEASE)
    assert use == restore_slots.SlotUse(cluster.id, 1, 1, ahead=0)


def test_with_a_limit_of_one_two_imports_restore_one_after_the_other(settings, cluster, made, corpus_source):
    """Real imports of chinook (real Runner, steps, heartbeats) into a cluster that takes one
    restore at once: both wait while a third job holds the slot, then restore in turn."""
    restore_slots.set_cluster_limit(cluster.id, 1)
    url = pg.url_for(corpus_source("chinook"), sslmode="disable")
    sealer = Sealer(settings.secret_key)
    imports: list[tuple[Job, InlineQueue]] = []
    for name in ("first", "second"):
        org = accounts.create_organization(name)
        project = accounts.create_project(org, name, sealer, cluster_id=cluster.id)
        queue = InlineQueue(settings)
        job, _ = start_import(
            project,
            Principal(org.id, None, "test"),
            ImportRequest(recreate=False, source=SourceURL.parse_source(url)),
            settings=settings,
            sealer=sealer,
            wake=queue.wake,
        )
        made.append(job.id)
        for stage in ("preflight", "fetch"):
            assert queue.woken.popleft() == (job.id, stage)
            queue.runner.run(job.id, stage)
        assert list(queue.woken) == [(job.id, "restore")]
        imports.append((job, queue))
    blocker = restoring(settings, cluster, made, "blocker")
    assert acquire(settings, blocker, "blocker")[0]

    def drain(queue: InlineQueue) -> None:
        try:
            queue.drain()
        finally:
            database.close()

    threads = []
    for ahead, (job, queue) in enumerate(imports):  # the first begins to wait first
        threads.append(threading.Thread(target=drain, args=(queue,)))
        threads[-1].start()
        counts = "1 of 1 in use" + (", 1 queued ahead" if ahead else "")
        wait_until(
            lambda job=job, counts=counts: (
                Job.get_by_id(job.id).progress.get("phase") == f"{WAITING} ({counts})"
            ),
            f"{job.id} to wait for the slot",
        )
    jobs.fail(blocker.id, "blocker", "done blocking", classification="permanent", holder="blocker")
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads)

    spans = []
    for job, _queue in imports:
        ended = Job.get_by_id(job.id)
        assert ended.state == "completed", ended.error
        assert sum(pg.row_counts(ended.project.database_name).values()) == 15607
        ids = {event.reason: event.id for event in jobs.events(job.id)}
        waited = next(
            i for reason, i in ids.items() if reason.startswith(f"{WAITING} {cluster.id} (1 of 1 in use")
        )
        taken = ids[f"restore slot taken on cluster {cluster.id} (1 of 1 in use)"]
        done = ids["restore done"]
        assert waited < taken < done
        spans.append((taken, done))
    # Event ids come from one sequence: the second restore took the slot only after the
    # first one's stage was done, and in the order they began to wait.
    (first_taken, first_done), (second_taken, _) = spans
    assert first_taken < first_done < second_taken
