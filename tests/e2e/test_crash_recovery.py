"""Fault injection with real processes: workers killed in each stage, a deploy's SIGTERM,
a whole host losing power, and jobs nothing would wake but the reaper.

The workers run with a 6 s lease and CAPY_TEST_HOLDS, which makes the first attempt of
a stage wait at a point (fetch and restore: a real psql running pg_sleep, as a slow
pg_dump or pg_restore would be; swap: inside the swap's transaction) so the test can
kill the worker there. Each test then leaves the job alone: it must end `completed` by
itself, with the live database whole and accepting connections, and nothing left over.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time

import psycopg2
import pytest
import requests

from pipeline import jobs
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.steps.results import ToolProcess
from stages.connections.pgurl import SourceURL
from stages.tools.commands import process_group_members
from tests.support import pg
from tests.support.processes import BIN, cli, migrated_with_local_cluster, service_env, start_service
from tests.support.world import make_world

LEASE = "6"
HOLD = "90"


@pytest.fixture(scope="module")
def deployment(control_db):
    """The control database migrated, with the local cluster registered, and queues of
    this module's own: the other e2e services' workers must not run its held jobs."""
    control_db = control_db.replace(queue_prefix=control_db.queue_prefix + "_crash")
    migrated_with_local_cluster(control_db)
    return control_db


def _worker_env(point: str) -> dict[str, str]:
    # One restore slot on the cluster: a killed holder's slot must not outlive its claim.
    return {
        "CAPY_LEASE_SECONDS": LEASE,
        "CAPY_TEST_HOLDS": f"{point}={HOLD}",
        "CAPY_CLUSTER_RESTORE_LIMIT": "1",
    }


def _tenant(env: dict[str, str]) -> dict:
    org = cli(env, "orgs", "create", "--name", "Crash org")
    project = cli(env, "projects", "create", "--org", org["id"], "--name", "crash")
    key = cli(env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "crash")
    return {"project": project, "key": key["key"]}


def _get(service, tenant, job_id: str) -> dict:
    resp = requests.get(
        f"{service.base_url}/v1/jobs/{job_id}",
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["job"]


def _start(service, tenant, source: str) -> str:
    resp = requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports",
        json={"confirm": True, "recreate": False, "source_url": pg.url_for(source, sslmode="disable")},
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job"]["id"]


def _wait_for_hold(service, tenant, job_id: str, point: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = _get(service, tenant, job_id)
        assert job["state"] in ("pending", "running"), (job["error"], service.log_tail())
        if job["progress"].get("phase") == f"test hold: {point}":
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached the {point} hold:\n{service.log_tail()}")


def _wait_for_end(services, tenant, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _get(services[-1], tenant, job_id)
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end by itself:\n" + "\n".join(s.log_tail() for s in services))


def _recorded_tool(job_id: str, program: str = "/psql") -> ToolProcess:
    """The tool the held stage started (a psql), as recorded on the job for a takeover;
    an earlier stage's last tool may still be the one recorded for a moment."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tool = Job.get_by_id(job_id).facts.tool_process
        if tool and tool.program.endswith(program):
            return tool
        time.sleep(0.2)
    raise AssertionError(f"no {program} was recorded on the job (last: {tool})")


def _wait_gone(pgid: int, program: str) -> list[int]:
    deadline = time.monotonic() + 20
    while (left := process_group_members(pgid, program)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _assert_recovered(settings, job: dict, source: str, live: str) -> None:
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    # The live database holds the source, and accepts connections.
    assert pg.admin("SELECT datallowconn FROM pg_database WHERE datname = %s", (live,)) == [(True,)]
    assert pg.row_counts(live) == pg.row_counts(source)
    # Nothing left over: no preview, no work directory, no tool.
    assert not pg.database_exists("capy_preview_" + job["id"].removeprefix("job_"))
    assert not os.path.exists(os.path.join(settings.work_dir, job["id"]))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("point", "how"),
    [
        ("fetch", "every process killed, then started again"),
        ("restore", "holder killed, the other worker goes on"),
        ("swap", "holder killed, the other worker goes on"),
        ("restore", "holder sent SIGTERM, then SIGKILL after 5 s"),
    ],
)
def test_a_job_whose_worker_dies_finishes_by_itself(deployment, corpus_source, tmp_path, point, how):
    source = corpus_source("chinook")
    workers = 1 if how.startswith("every") else 2
    service = start_service(deployment, tmp_path / "first", workers=workers, worker_env=_worker_env(point))
    services = [service]
    try:
        tenant = _tenant(service.env)
        live = tenant["project"]["database_name"]
        job_id = _start(service, tenant, source)
        held = _wait_for_hold(service, tenant, job_id, point)
        holder = service.worker_holding(int(held["claimed_by"].split(":")[1]))
        tool = _recorded_tool(job_id) if point != "swap" else None
        if tool is not None:
            assert tool.program.endswith("/psql"), tool
            assert process_group_members(tool.pgid, tool.program), "the held tool is not running"

        if how.startswith("every"):
            service.kill_all()
        elif "SIGTERM" in how:
            # As a deploy stops it: SIGTERM to the main process (which passes it on to
            # its worker processes), then SIGKILL to everything left after 5 s.
            service.workers[holder].send_signal(signal.SIGTERM)
            time.sleep(5)
            service.kill(holder, signal.SIGKILL)
        else:
            service.kill(holder, signal.SIGKILL)

        if tool is not None:
            # The tool died with its worker (parent-death signal), not at the next claim
            # (a takeover would kill it too, but only after the lease).
            assert _wait_gone(tool.pgid, tool.program) == []
            if "SIGTERM" not in how:  # (at a SIGTERM the stage stops it and hands the claim back)
                assert Job.get_by_id(job_id).claimed_by == held["claimed_by"], "the tool outlived its worker"
        if point == "swap":
            # The swap's transaction died with its session: the live database was never
            # left refusing connections.
            conn = psycopg2.connect(pg.url_for(live))
            conn.close()
        if how.startswith("every"):
            services.append(start_service(deployment, tmp_path / "second", worker_env=_worker_env(point)))

        job = _wait_for_end(services, tenant, job_id)
        _assert_recovered(deployment, job, source, live)
        reasons = [e["reason"] for e in cli(service.env, "jobs", "show", job_id)["events"]]
        if "SIGTERM" in how:
            # Handed back at shutdown, not left for the lease to expire.
            assert any("shut down; it will be resumed" in r for r in reasons), reasons
        else:
            assert any("taking over the stale claim" in r for r in reasons), reasons
        # No stage ran twice at once: every claim of the held stage after the first
        # came after the first's claim had gone stale or was handed back.
        assert sum(f"{'finalize' if point == 'swap' else point} claimed" in r for r in reasons) == 2, reasons
        if point == "restore":  # each claim took the cluster's only restore slot in turn
            assert sum(r.startswith("restore slot taken") for r in reasons) == 2, reasons
    finally:
        for running in services:
            running.stop()


@pytest.mark.e2e
def test_sweep_wakes_jobs_that_no_message_will_wake(deployment, corpus_source, tmp_path):
    """A pending job whose message was never published, and a running job whose worker
    died with its message lost: `capy-imports sweep` wakes both, and they complete."""
    source = SourceURL.parse(pg.url_for(corpus_source("chinook"), sslmode="disable"))
    settings = deployment.replace(lease_seconds=int(LEASE))
    service = start_service(deployment, tmp_path, worker_env={"CAPY_LEASE_SECONDS": LEASE})
    try:
        stuck = []
        for _ in range(2):
            world = make_world(settings)
            job, _created = start_import(
                world.project,
                Principal(world.org.id, None, "test"),
                ImportRequest(recreate=False, source=source),
                settings=settings,
                sealer=Sealer(settings.secret_key),
                wake=lambda job_id, stage: None,  # the message is lost
            )
            stuck.append(job.id)
        long_ago = jobs.utcnow() - dt.timedelta(minutes=5)
        Job.update(created_at=long_ago, updated_at=long_ago).where(Job.id == stuck[0]).execute()
        Job.update(
            state="running",
            claimed_by="gone-host:1:1",
            claimed_at=long_ago,
            heartbeat_at=long_ago,
            updated_at=long_ago,
            started_at=long_ago,
            attempts=1,
        ).where(Job.id == stuck[1]).execute()

        swept = cli(service.env, "sweep")
        assert {w["job"] for w in swept["jobs_woken"]} >= set(stuck), swept
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = [Job.get_by_id(job_id).state for job_id in stuck]
            if all(state in ("completed", "failed") for state in states):
                break
            time.sleep(0.5)
        for job_id in stuck:
            job = Job.get_by_id(job_id)
            assert job.state == "completed", (job.error, service.log_tail())
        # Once done, a sweep finds nothing of them to wake.
        assert not set(stuck) & {w["job"] for w in cli(service.env, "sweep")["jobs_woken"]}
    finally:
        service.stop()


@pytest.mark.e2e
def test_the_worker_refuses_a_stage_limit_the_broker_would_cut_short(deployment, tmp_path):
    from tests.e2e.test_deployments import procfile_command, start, stop

    env = service_env(deployment, CAPY_STAGE_TIME_LIMIT_SECONDS="21600")
    log = tmp_path / "worker.log"
    process = start(procfile_command("worker"), env, log)
    try:
        code = process.wait(timeout=60)
    finally:
        stop(process)
    output = log.read_text(errors="replace")
    assert code != 0, output
    assert (
        "CAPY_STAGE_TIME_LIMIT_SECONDS (21600) must be below CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS (1800)"
        in output
    )


@pytest.mark.e2e
def test_the_clock_sweeps_every_interval_and_stops_on_sigterm(deployment, store, tmp_path):
    from tests.e2e.test_deployments import procfile_command

    assert (
        procfile_command("clock")
        == procfile_command("clock", "Procfile.dev")
        == "capy-imports clock --every 60"
    )
    log = tmp_path / "clock.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [str(BIN / "capy-imports"), "clock", "--every", "1"],
            env=service_env(deployment),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while log.read_text(errors="replace").count("] ") < 2 and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(errors="replace")
            time.sleep(0.3)
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert output.count("] ") >= 2, output  # one timestamped summary per round
    assert "could not" not in output, output
    assert "clock stopped after" in output, output
