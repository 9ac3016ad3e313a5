"""Guards against the real control database: a worker whose claim was taken over changes
nothing (no failure, no cleanup of the new holder's preview, no progress, facts or
command output), transitions check the stage, and facts merge instead of overwrite."""

from __future__ import annotations

import datetime as dt
import threading
import time

import psycopg2
import pytest

from pipeline import jobs
from pipeline.db import database
from pipeline.import_steps import ImportSteps, StageContext, preview_name
from pipeline.models import Job
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from pipeline.steps.results import (
    FinalizeResult,
    JobFacts,
    PreflightResult,
    RestoreResult,
    StageResult,
    ToolProcess,
    Verification,
)
from stages.errors import PermanentError
from stages.tools.commands import PgCommand, process_group_members
from tests.support import pg
from tests.support.imports import unwoken_job
from tests.support.world import make_world

LEASE = dt.timedelta(seconds=60)


def new_job(settings):
    world = make_world(settings)
    job = unwoken_job(settings, world)
    return job


def take_over(job_id: str, stage: str, old: str, new: str) -> Job:
    """`old`'s heartbeat goes stale and `new` claims the stage, as after a worker hang."""
    Job.update(heartbeat_at=jobs.utcnow() - dt.timedelta(minutes=5)).where(
        (Job.id == job_id) & (Job.claimed_by == old)
    ).execute()
    taken = jobs.claim(job_id, stage, new, lease=LEASE)
    assert taken is not None and taken.claimed_by == new
    return taken


def new_holders_preview(job: Job) -> str:
    """The new holder's restore creates its preview (a real database) and records it."""
    preview = preview_name(job)
    pg.create_db(preview)
    Job.update(preview_database_id=preview).where(Job.id == job.id).execute()
    return preview


def reasons(job_id: str) -> list[str]:
    return [event.reason for event in jobs.events(job_id)]


class TakenOverMidStage(ImportSteps):
    """A restore attempt that loses its claim to `w2` (which makes its own preview) while
    it works, then fails, or carries on to a side effect on the cluster."""

    def __init__(self, *args, fail_with: Exception | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_with = fail_with
        self.side_effect_done = False

    def run(self, stage, context):
        taken = take_over(context.job.id, stage, context.actor, "w2")
        new_holders_preview(taken)
        if self.fail_with is not None:
            raise self.fail_with
        context.progress({"phase": "dropping the old preview"})  # the old holder's next write
        self.side_effect_done = True
        return RestoreResult(preview_database=preview_name(context.job))


@pytest.fixture
def restore_job(control_db):
    job = new_job(control_db)
    Job.update(stage="restore", facts={"preflight": {}}).where(Job.id == job.id).execute()
    return Job.get_by_id(job.id)


def runner_with(settings, store, **kwargs):
    steps = TakenOverMidStage(settings, Sealer(settings.secret_key), store, **kwargs)
    # Heartbeats far apart: the takeover inside the stage is what the test controls.
    return Runner(settings, steps, lambda *a, **k: None, heartbeat_seconds=30), steps


def test_a_taken_over_claim_neither_fails_the_job_nor_drops_the_new_holders_preview(
    control_db, store, restore_job
):
    runner, _steps = runner_with(control_db, store, fail_with=PermanentError("the dump is damaged"))
    runner.run(restore_job.id, "restore")
    job = Job.get_by_id(restore_job.id)
    assert (job.state, job.stage, job.claimed_by) == ("running", "restore", "w2")
    assert job.error is None and job.preview_database_id == preview_name(job)
    assert pg.admin("SELECT 1 FROM pg_database WHERE datname = %s", (job.preview_database_id,)) == [(1,)]
    assert not any(reason.startswith("failed") for reason in reasons(job.id))


def test_the_old_holders_fail_is_refused_and_cleans_nothing(control_db, store, restore_job):
    """Runner._fail as the old holder, after the takeover: nothing happens."""
    runner, _steps = runner_with(control_db, store)
    old = jobs.claim(restore_job.id, "restore", "w1", lease=LEASE)
    taken = take_over(old.id, "restore", "w1", "w2")
    preview = new_holders_preview(taken)
    runner._fail(old, "w1", "the old holder's late failure", "permanent")
    job = Job.get_by_id(old.id)
    assert (job.state, job.claimed_by, job.error, job.preview_database_id) == ("running", "w2", None, preview)
    assert pg.admin("SELECT 1 FROM pg_database WHERE datname = %s", (preview,)) == [(1,)]


def test_a_lost_claim_stops_the_stage_before_its_next_side_effect(control_db, store, restore_job):
    runner, steps = runner_with(control_db, store)
    runner.run(restore_job.id, "restore")
    assert not steps.side_effect_done
    job = Job.get_by_id(restore_job.id)
    assert (job.state, job.stage, job.claimed_by) == ("running", "restore", "w2")
    assert job.facts.preview_database is None and job.preview_database_id == preview_name(job)


def test_complete_and_advance_refuse_a_wrong_stage(control_db):
    job = new_job(control_db)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    assert (
        jobs.complete(job.id, "w1", "finalize", facts=StageResult(), progress={"phase": "completed"}) is None
    )
    assert jobs.advance(job.id, "w1", "fetch", facts=StageResult()) is None
    with pytest.raises(ValueError, match="only at its last stage"):
        jobs.complete(job.id, "w1", "preflight", facts=StageResult(), progress={})
    still = Job.get_by_id(job.id)
    assert (still.state, still.stage, still.claimed_by) == ("running", "preflight", "w1")
    assert reasons(job.id) == ["import requested", "preflight claimed (attempt 1 of 3)"]
    Job.update(stage="finalize").where(Job.id == job.id).execute()
    done = jobs.complete(
        job.id, "w1", "finalize", facts=FinalizeResult(replaced_database="b"), progress={"phase": "completed"}
    )
    assert done.state == "completed" and done.facts.stored() == {"replaced_database": "b"}


def test_writes_of_a_stale_holder_are_ignored(control_db):
    job = new_job(control_db)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    take_over(job.id, "preflight", "w1", "w2")
    assert jobs.set_progress(job.id, "w2", {"phase": "w2 works"})
    assert jobs.record_command(job.id, "w2", exit_code=0, stdout="w2 out", stderr="")
    assert jobs.merge_facts(job.id, "w2", RestoreResult(preview_database="by_w2"))
    before = Job.get_by_id(job.id)

    assert not jobs.set_progress(job.id, "w1", {"phase": "w1 still thinks it runs"})
    assert not jobs.record_command(job.id, "w1", exit_code=1, stdout="", stderr="w1's failure")
    assert not jobs.merge_facts(
        job.id, "w1", FinalizeResult(verification=Verification(target_counts={}, target={"stale": True}))
    )
    assert not jobs.set_preview(job.id, "w1", "capy_preview_of_w1")
    assert not jobs.record_tool_process(job.id, "w1", ToolProcess(pgid=1, program="pg_restore"))
    context = StageContext(before, "w1")
    with pytest.raises(jobs.ClaimLost):
        context.progress({"phase": "w1 again"})
    with pytest.raises(jobs.ClaimLost):
        context.merge_facts(RestoreResult(preview_database="by_w1"))
    with pytest.raises(jobs.ClaimLost):  # what the restore and the swap ask first
        StageContext(before, "w1").confirm_claim()
    after = Job.get_by_id(job.id)
    assert (
        after.progress,
        after.facts.stored(),
        after.last_exit_code,
        after.last_stdout,
        after.last_stderr,
    ) == (
        {"phase": "w2 works"},
        {"preview_database": "by_w2"},
        0,
        "w2 out",
        None,
    )
    assert after.preview_database_id is None and after.updated_at == before.updated_at


def test_advance_merges_its_facts_with_a_concurrent_write(control_db):
    """The stage's result arrives while another session writes the job's facts (a test
    hold is noted): both survive, where a read-modify-write lost one."""
    job = new_job(control_db)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    other = psycopg2.connect(control_db.database_url)
    try:
        with other.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET facts = facts || %s::jsonb WHERE id = %s",
                ('{"test_holds_done": ["fetch"]}', job.id),
            )
        outcome = []

        def advance():
            try:
                outcome.append(
                    jobs.advance(job.id, "w1", "preflight", facts=PreflightResult(preflight={"ok": True}))
                )
            finally:
                database.close()

        thread = threading.Thread(target=advance)
        thread.start()
        time.sleep(0.5)  # advance has read what it reads and waits for the row
        other.commit()
        thread.join(30)
    finally:
        other.close()
    assert outcome and outcome[0] is not None
    assert Job.get_by_id(job.id).facts.stored() == {
        "test_holds_done": ["fetch"],
        "preflight": {"ok": True},
    }


def test_a_stage_that_ends_well_leaves_no_tool_recorded(control_db):
    """Every tool of a stage that advanced has exited: the next stage's claim finds no
    earlier claim's tool to stop (the runner's take-over, a session round trip)."""
    job = new_job(control_db)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    assert jobs.record_tool_process(job.id, "w1", ToolProcess(pgid=42, program="pg_dump"))
    assert Job.get_by_id(job.id).facts.tool_process == ToolProcess(pgid=42, program="pg_dump")
    assert jobs.advance(job.id, "w1", "preflight", facts=PreflightResult(preflight={"ok": True}))
    after = Job.get_by_id(job.id)
    assert after.facts.tool_process is None and after.facts.preflight == {"ok": True}


def test_concurrent_fact_merges_all_survive(control_db):
    job = new_job(control_db)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)

    def merge(prefix):
        try:
            for i in range(20):
                assert jobs.merge_facts(job.id, "w1", JobFacts.model_validate({f"{prefix}{i}": i}))
        finally:
            database.close()

    threads = [threading.Thread(target=merge, args=(prefix,)) for prefix in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert Job.get_by_id(job.id).facts.model_extra == {f"{p}{i}": i for p in "abc" for i in range(20)}


def test_every_transition_writes_its_event_with_what_it_changed(control_db):
    job = new_job(control_db)
    jobs.claim(job.id, "preflight", "w1", lease=LEASE)
    jobs.advance(job.id, "w1", "preflight", facts=StageResult())
    events = jobs.events(job.id)
    assert [(e.from_state, e.to_state, e.from_stage, e.to_stage) for e in events] == [
        (None, "pending", None, "preflight"),
        ("pending", "running", "preflight", "preflight"),
        ("running", "running", "preflight", "fetch"),
    ]
    assert jobs.transition(job.id, "w1", "never", where=Job.stage == "restore", stage="finalize") is None
    assert len(jobs.events(job.id)) == 3


class Sleep(PgCommand):
    """A tool that takes as long as it is told: /usr/bin/sleep, run like a pg tool."""

    program = "sleep"


class SlowTool:
    """Steps whose stage runs one long tool under the stage's cancellation."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.tool: tuple[int, str] | None = None

    def _started(self, pgid: int, program: str) -> None:
        self.tool = (pgid, program)
        self.started.set()

    def run(self, stage, context):
        Sleep("/usr/bin", on_start=self._started, stall_seconds=None, cancellation=context.cancellation).run(
            ["60"], what="a slow tool"
        )
        return PreflightResult(preflight={"slow tool": "done"})

    def cleanup(self, job, *, succeeded):
        raise AssertionError("a worker that lost its claim cleans nothing up")

    def stop_sessions(self, job):
        raise AssertionError("a worker that lost its claim stops no sessions")

    def take_over(self, job):
        pass


def test_a_claim_lost_while_a_tool_runs_stops_the_tool_and_changes_nothing(control_db):
    job = new_job(control_db)
    steps = SlowTool()
    runner = Runner(control_db, steps, lambda *a, **k: None, heartbeat_seconds=0.5)
    outcome: list[BaseException | None] = []

    def run():
        try:
            runner.run(job.id, "preflight")
            outcome.append(None)
        except BaseException as err:  # handed to the test below
            outcome.append(err)
        finally:
            database.close()

    thread = threading.Thread(target=run)
    thread.start()
    assert steps.started.wait(30)
    holder = Job.get_by_id(job.id).claimed_by
    deadline = time.monotonic() + 30
    while Job.get_by_id(job.id).claimed_by != "w2" and time.monotonic() < deadline:
        Job.update(heartbeat_at=jobs.utcnow() - dt.timedelta(minutes=5)).where(
            (Job.id == job.id) & (Job.claimed_by == holder)
        ).execute()
        jobs.claim(job.id, "preflight", "w2", lease=LEASE)
    # The old holder's heartbeat finds the claim gone and stops its tool: well before
    # the tool would end by itself (60 s), the stage has returned.
    thread.join(20)
    assert not thread.is_alive() and outcome == [None]
    assert process_group_members(*steps.tool) == []
    after = Job.get_by_id(job.id)
    assert (after.state, after.stage, after.claimed_by, after.error) == ("running", "preflight", "w2", None)
    assert after.facts.preflight is None  # the stage's result was not written
    assert not any(reason.startswith(("failed", "preflight done")) for reason in reasons(job.id))
