"""Fair share: one organization's imports cannot take every worker thread."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from pipeline import accounts, jobs
from pipeline.db import database
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, Organization, Project
from pipeline.principals import Principal
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from pipeline.steps.results import StageResult
from stages.connections.pgurl import SourceURL
from tests.support.world import make_world

LEASE = dt.timedelta(seconds=60)
WAITING = "waiting for other imports of the organization to finish"


class NoSteps:
    """A stage must not run when the claim was refused."""

    def run(self, stage, context):
        raise AssertionError(f"{stage} ran although the organization is at its limit")


@pytest.fixture
def settings(control_db):
    return control_db.replace(org_max_active_jobs=1, org_wait_retry_seconds=30)


def add_project(settings, org: Organization, name: str) -> Project:
    return accounts.create_project(
        org, name, Sealer(settings.secret_key), cluster_id=Project.select().first().cluster_id
    )


def new_job(settings, project: Project) -> Job:
    job, _ = start_import(
        project,
        Principal(project.organization_id, None, "test"),
        ImportRequest(recreate=False, source=SourceURL.parse("postgres://u:pw@db.example.com/app")),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=lambda job_id, stage: None,
    )
    return job


def test_a_second_import_of_a_busy_organization_waits_while_another_organization_runs(settings):
    a = make_world(settings)
    first = new_job(settings, a.project)
    second = new_job(settings, add_project(settings, a.org, "second"))
    other = new_job(settings, make_world(settings).project)
    assert jobs.claim(first.id, "preflight", "w1", lease=LEASE, org_limit=1) is not None

    woken = []
    runner = Runner(
        settings, NoSteps(), lambda job_id, stage, delay_ms=0: woken.append((job_id, stage, delay_ms))
    )
    runner.run(second.id, "preflight")

    # Woken again later, without using an attempt; the user sees why it waits.
    assert woken == [(second.id, "preflight", 30_000)]
    waiting = Job.get_by_id(second.id)
    assert (waiting.state, waiting.stage, waiting.attempts, waiting.claimed_by) == (
        "pending",
        "preflight",
        0,
        None,
    )
    assert waiting.progress["phase"] == WAITING
    assert (waiting.progress["active_imports"], waiting.progress["limit"]) == (1, 1)
    assert "CAPY_ORG_MAX_ACTIVE_JOBS" in waiting.progress["detail"]
    # Another organization's import is not held up.
    assert jobs.claim(other.id, "preflight", "w3", lease=LEASE, org_limit=1).claimed_by == "w3"

    # A claim whose worker died (stale heartbeat) no longer counts.
    Job.update(heartbeat_at=jobs.utcnow() - dt.timedelta(minutes=5)).where(Job.id == first.id).execute()
    taken = jobs.claim(second.id, "preflight", "w2", lease=LEASE, org_limit=1)
    assert taken is not None and taken.attempts == 1


def test_a_finished_stage_frees_the_organizations_slot(settings):
    a = make_world(settings)
    first = new_job(settings, a.project)
    second = new_job(settings, add_project(settings, a.org, "second"))
    jobs.claim(first.id, "preflight", "w1", lease=LEASE, org_limit=1)
    with pytest.raises(jobs.OrganizationAtLimit) as info:
        jobs.claim(second.id, "preflight", "w2", lease=LEASE, org_limit=1)
    assert (info.value.active, info.value.limit) == (1, 1)
    jobs.advance(first.id, "w1", "preflight", facts=StageResult())  # between stages: holds no claim
    assert jobs.claim(second.id, "preflight", "w2", lease=LEASE, org_limit=1) is not None
    with pytest.raises(jobs.OrganizationAtLimit):
        jobs.claim(first.id, "fetch", "w1", lease=LEASE, org_limit=1)
    # Without a limit (operators' tools), claims are as before.
    assert jobs.claim(first.id, "fetch", "w1", lease=LEASE) is not None


def claim_together(pair: list[Job]) -> dict[str, object]:
    """Claim each job in a thread of its own, all released at the same instant."""
    barrier = threading.Barrier(len(pair))
    outcome: dict[str, object] = {}

    def claim(job: Job, actor: str) -> None:
        try:
            barrier.wait()
            outcome[actor] = jobs.claim(job.id, "preflight", actor, lease=LEASE, org_limit=1)
        except jobs.OrganizationAtLimit:
            outcome[actor] = "refused"
        finally:
            database.close()  # the thread's own connection

    threads = [threading.Thread(target=claim, args=(job, f"w{i}")) for i, job in enumerate(pair)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcome


def test_concurrent_claims_in_one_organization_admit_exactly_the_limit(settings):
    world = make_world(settings)
    projects = [world.project, add_project(settings, world.org, "second")]
    for _round in range(5):
        pair = [new_job(settings, project) for project in projects]
        outcome = claim_together(pair)
        assert sorted(type(value).__name__ for value in outcome.values()) == ["Job", "str"], outcome
        assert list(outcome.values()).count("refused") == 1
        for job in pair:
            jobs.fail(job.id, "test", "round over", classification="permanent")
