"""Recovery against the real control database: the stage actors' options through
Dramatiq's real Worker (StubBroker), a foreign lease met by a redelivery, the reaper."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import threading
import time

import dramatiq
import pytest

from pipeline import jobs
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, JobEvent
from pipeline.principals import Principal
from pipeline.runner import RECHECK_MARGIN, Runner
from pipeline.sealing import Sealer
from pipeline.steps.results import StageResult
from pipeline.sweep import sweep
from stages.connections.pgurl import SourceURL
from stages.tools.commands import PgCommand, process_group_members
from tests.support import pg
from tests.support.imports import unwoken_job
from tests.support.stubworker import stage_workers
from tests.support.world import make_world


class Sleep(PgCommand):
    """A tool that takes as long as it is told: /usr/bin/sleep, run like a pg tool."""

    program = "sleep"


class SlowStage:
    """Steps whose every stage runs one long tool, telling when it started."""

    def __init__(self, seconds: int = 300) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.tool: tuple[int, str] | None = None

    def _started(self, pgid: int, program: str) -> None:
        self.tool = (pgid, program)
        self.started.set()

    def run(self, stage, context):
        Sleep("/usr/bin", on_start=self._started, stall_seconds=None).run(
            [str(self.seconds)], what="a slow tool"
        )
        return StageResult()

    def cleanup(self, job, *, succeeded):
        pass

    def stop_sessions(self, job):
        pass

    def take_over(self, job):
        pass


def new_job(settings, stage="fetch", **fields):
    world = make_world(settings)
    job = unwoken_job(settings, world)
    Job.update(stage=stage, **fields).where(Job.id == job.id).execute()
    return Job.get_by_id(job.id)


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


class Enqueued(dramatiq.Middleware):
    """Records every message sent: (queue, delay)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None]] = []

    def after_enqueue(self, broker, message, delay):
        self.sent.append((message.queue_name, delay))


@pytest.fixture
def stub_queue(control_db):
    """The real stage actors on a StubBroker, served by a real dramatiq Worker."""
    with stage_workers(control_db) as workers:

        def make(steps, **overrides):
            _settings, queue, worker = workers.start(steps, middleware=[Enqueued()], **overrides)
            return queue, worker

        yield make


def test_the_stage_time_limit_stops_the_tool_and_fails_the_job(control_db, stub_queue):
    steps = SlowStage()
    queue, _worker = stub_queue(steps, stage_time_limit_seconds=1)
    job = new_job(control_db)
    queue.actors["fetch"].send(job.id)
    assert steps.started.wait(30)
    # Well before the tool would end by itself (300 s), the limit has stopped it.
    assert wait_until(lambda: Job.get_by_id(job.id).state == "failed", timeout=60)
    failed = Job.get_by_id(job.id)
    assert failed.retry_classification == "permanent" and failed.claimed_by is None
    assert "ran longer than its time limit of 1 s (CAPY_STAGE_TIME_LIMIT_SECONDS)" in failed.error
    assert process_group_members(*steps.tool) == []


def test_a_worker_shutdown_hands_the_stage_back_and_requeues_it(control_db, stub_queue):
    steps = SlowStage()
    queue, worker = stub_queue(steps)
    job = new_job(control_db)
    queue.actors["fetch"].send(job.id)
    assert steps.started.wait(30)
    worker.stop(timeout=20_000)  # what dramatiq does on SIGTERM
    handed_back = Job.get_by_id(job.id)
    assert (handed_back.state, handed_back.stage, handed_back.claimed_by) == ("running", "fetch", None)
    assert handed_back.attempts == 0  # a shutdown is not a failed attempt
    assert "shut down; it will be resumed" in jobs.events(job.id)[-1].reason
    # Woken again at once for another worker, not after the lease.
    [enqueued] = [m for m in queue.broker.middleware if isinstance(m, Enqueued)]
    assert enqueued.sent[-1] == (queue.actors["fetch"].queue_name, None)
    assert process_group_members(*steps.tool) == []


def test_a_redelivery_that_meets_a_live_foreign_lease_looks_again_after_it(control_db):
    beat = jobs.utcnow() - dt.timedelta(seconds=20)
    job = new_job(control_db, state="running", claimed_by="dead-host:1:1", heartbeat_at=beat, attempts=1)
    woken = []
    runner = Runner(
        control_db, SlowStage(), lambda job_id, stage, delay_ms=0: woken.append((job_id, stage, delay_ms))
    )
    runner.run(job.id, "fetch")
    [(job_id, stage, delay_ms)] = woken
    remaining = (beat + runner.lease - jobs.utcnow()).total_seconds() * 1000
    assert (job_id, stage) == (job.id, "fetch")
    assert remaining <= delay_ms <= remaining + RECHECK_MARGIN.total_seconds() * 1000 + 5_000
    untouched = Job.get_by_id(job.id)
    assert (untouched.claimed_by, untouched.attempts) == ("dead-host:1:1", 1)  # no attempt used


class TakeOvers(SlowStage):
    """Steps whose stages end at once, noting each take-over the runner asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.taken_over: list[str] = []

    def run(self, stage, context):
        return StageResult()

    def take_over(self, job):
        self.taken_over.append(job.id)


def test_a_claim_that_takes_a_stale_one_over_stops_what_it_left_even_at_its_first_attempt(control_db):
    """A replay resets attempts (pipeline.deadletters) while a stale claim still holds the
    job, and a stage that records no tool (finalize; a live copy of small tables) leaves
    nothing else to say so: the claim that displaces it still ends its tools and sessions."""
    stale = jobs.utcnow() - dt.timedelta(hours=1)
    job = new_job(control_db, state="running", claimed_by="partitioned:1:1", heartbeat_at=stale, attempts=0)
    steps = TakeOvers()
    Runner(control_db, steps, lambda job_id, stage, delay_ms=0: None).run(job.id, "fetch")
    assert steps.taken_over == [job.id]
    assert "taking over the stale claim of partitioned:1:1" in jobs.events(job.id)[-2].reason
    # A first claim of an unclaimed stage with no tool recorded takes nothing over.
    fresh = new_job(control_db, state="running", attempts=0)
    Runner(control_db, steps, lambda job_id, stage, delay_ms=0: None).run(fresh.id, "fetch")
    assert steps.taken_over == [job.id]
    assert Job.get_by_id(fresh.id).stage == "restore"


def test_sweep_reaps_stuck_jobs_work_dirs_and_disabled_databases(control_db, store):
    now = jobs.utcnow()
    old = now - dt.timedelta(minutes=30)
    stale = new_job(
        control_db, state="running", claimed_by="gone:1:1", heartbeat_at=old, updated_at=old, attempts=1
    )
    live = new_job(control_db, state="running", claimed_by="alive:1:1", heartbeat_at=now, attempts=1)
    lost = new_job(control_db, stage="restore", state="running", updated_at=old)
    unpublished = new_job(control_db, stage="preflight", created_at=old, updated_at=old)
    fresh = new_job(control_db, stage="preflight")
    # Created long ago, but retried (or woken) a moment ago: its wake-up is on its way.
    moved = new_job(control_db, stage="preflight", created_at=old, updated_at=now)
    JobEvent.create(job=moved.id, actor="operator:tester", reason="retried by operator:tester")
    ended = new_job(control_db, state="completed", completed_at=now)
    for job in (ended, live):
        os.makedirs(os.path.join(control_db.work_dir, job.id, "dump"), exist_ok=True)
    disabled = make_world(control_db).project.database_name
    pg.admin(f'ALTER DATABASE "{disabled}" ALLOW_CONNECTIONS false')

    woken = []
    done = sweep(
        control_db,
        Sealer(control_db.secret_key),
        store,
        wake=lambda job_id, stage: woken.append((job_id, stage)),
    )

    assert {(stale.id, "fetch"), (lost.id, "restore"), (unpublished.id, "preflight")} <= set(woken)
    assert not {live.id, fresh.id, moved.id, ended.id} & {job_id for job_id, _ in woken}
    assert {w["job"] for w in done["jobs_woken"]} == {job_id for job_id, _ in woken}
    assert ended.id in done["work_dirs_removed"] and not os.path.exists(
        os.path.join(control_db.work_dir, ended.id)
    )
    assert os.path.isdir(os.path.join(control_db.work_dir, live.id))
    # Woken once: the next round leaves them to the message it sent.
    again = []
    sweep(control_db, Sealer(control_db.secret_key), store, wake=lambda job_id, stage: again.append(job_id))
    assert not {stale.id, lost.id, unpublished.id} & set(again)
    assert disabled in done["databases_reopened"]
    assert pg.admin("SELECT datallowconn FROM pg_database WHERE datname = %s", (disabled,)) == [(True,)]


CHILD = """
import sys, time
from stages.tools.commands import PgCommand
class Sleep(PgCommand):
    program = "sleep"
tool = Sleep("/usr/bin", stall_seconds=None)
process = tool.start(["300"])
print(process.pid, flush=True)
time.sleep(300)
"""


def test_a_tool_dies_with_the_worker_that_started_it():
    """SIGKILL gives a worker no chance to stop its tools (they run in sessions of
    their own): the kernel's parent-death signal does."""
    import signal
    import subprocess
    import sys

    worker = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        tool = int(worker.stdout.readline())
        assert process_group_members(tool, "/usr/bin/sleep") == [tool]
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert wait_until(lambda: process_group_members(tool, "/usr/bin/sleep") == [], timeout=20)
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()


FORKING_CHILD = """
import sys, time
from stages.tools.commands import PgCommand
class Forker(PgCommand):
    program = "sh"
tool = Forker("/bin", stall_seconds=None)
# As pg_dump --jobs does: workers of its own, which outlive it unless told.
process = tool.start(["-c", "/usr/bin/sleep 300 & /usr/bin/sleep 300 & wait"])
print(process.pid, flush=True)
time.sleep(300)
"""


def test_the_workers_a_tool_forked_die_with_the_worker_too():
    """The parent-death signal reaches only the tool; what the tool forked (pg_dump's
    and pg_restore's --jobs workers) is stopped by the group's reaper."""
    import signal
    import subprocess
    import sys

    worker = subprocess.Popen([sys.executable, "-c", FORKING_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        tool = int(worker.stdout.readline())
        assert wait_until(lambda: len(process_group_members(tool, "/usr/bin/sleep")) == 2, timeout=10)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert wait_until(lambda: process_group_members(tool, "/usr/bin/sleep") == [], timeout=20)
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()


def test_a_takeover_kills_the_tool_an_earlier_claim_left_on_this_host(control_db):
    from pipeline.import_steps import ImportSteps, host_identity

    started = []
    label = "job_" + secrets.token_hex(8)
    tool = Sleep(
        "/usr/bin",
        stall_seconds=None,
        on_start=lambda pgid, program: started.append((pgid, program)),
        label=label,
    )
    process = tool.start(["300"])
    [(pgid, program)] = started
    assert pgid == process.pid and program == "/usr/bin/sleep"
    steps = ImportSteps(control_db, Sealer(control_db.secret_key), store=None)

    def recorded(**changes):
        tool_process = {"host": host_identity(), "pgid": pgid, "program": program, "label": label, **changes}
        return new_job(control_db, facts={"tool_process": tool_process})

    # Recorded on another host (or before a reboot): the parent-death signal's business.
    steps.take_over(recorded(host="elsewhere/boot"))
    # A group id now used by another program, or by a tool of another job: left alone.
    steps.take_over(recorded(program="/usr/bin/pg_dump"))
    steps.take_over(recorded(label="job_someone_else"))
    assert process.poll() is None
    steps.take_over(recorded())
    assert process.wait(10) == -9
    tool.abort(process)  # joins its readers, closes its pipes


def test_ending_a_job_kills_the_tool_an_earlier_claim_left_on_this_host(control_db):
    """A cancel of a stale claim, a job failed when its retries ran out, a replay or a
    retry that starts again at attempt 1: none of them leaves the dead claim's tool."""
    from pipeline.import_steps import ImportSteps, host_identity

    started = []
    label = "job_" + secrets.token_hex(8)
    tool = Sleep(
        "/usr/bin",
        stall_seconds=None,
        on_start=lambda pgid, program: started.append((pgid, program)),
        label=label,
    )
    process = tool.start(["300"])
    [(pgid, program)] = started
    steps = ImportSteps(control_db, Sealer(control_db.secret_key), store=None)
    job = new_job(
        control_db,
        facts={"tool_process": {"host": host_identity(), "pgid": pgid, "program": program, "label": label}},
    )
    steps.cleanup(job, succeeded=False)
    assert process.wait(10) == -9
    tool.abort(process)


def test_a_finalize_retried_after_an_old_swap_crash_reopens_the_live_database(control_db, corpus_source):
    """A swap that crashed before swaps were one transaction left the live database
    refusing connections; the retried finalize (recreate: false, so it must read the
    live database to check it is still empty) re-enables it and completes."""
    from tests.support.inline import InlineQueue

    world = make_world(control_db)
    live = world.project.database_name
    queue = InlineQueue(control_db)
    source = SourceURL.parse_source(pg.url_for(corpus_source("chinook"), sslmode="disable"))
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=False, source=source),
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=queue.wake,
    )
    while queue.woken:
        job_id, stage = queue.woken.popleft()
        if stage == "finalize":
            pg.admin(f'ALTER DATABASE "{live}" ALLOW_CONNECTIONS false')
        queue.runner.run(job_id, stage)
    done = Job.get_by_id(job.id)
    assert done.state == "completed", done.error
    assert pg.admin("SELECT datallowconn FROM pg_database WHERE datname = %s", (live,)) == [(True,)]
    assert pg.row_counts(live) == pg.row_counts(corpus_source("chinook"))
