"""The service under test: a private instance, driven over HTTP like a user.

`running_service(...)` starts what `make run` starts, on the bench's own resources so it
can run next to a developer's instance and the test suites: its own SeaweedFS (free
ports), its own control database (`capybench_ctl_<run>`) and RabbitMQ queue prefix
(`capybench_<run>`), its own CAPY_WORK_DIR, gunicorn and one dramatiq worker with
CAPY_CONCURRENCY=2. On exit it stops every process and drops every database, role and
queue it made. It reuses the e2e tests' process helpers (tests/support), which start
exactly these processes.

Each round imports into a fresh project (so no `recreate` and no replaced database to
keep), and is timed from the moment `POST /v1/projects/{id}/imports` is sent to the
job's `completed_at`: the instant the worker completed it, on this host's clock (the
service runs here, so the bench and the worker read the same clock). The poll that then
sees `completed` comes up to a poll's interval later; that lag is the bench's, not the
service's (a baseline's time ends when its process exits), so it is kept apart, as
`polled_s`. Polls come every 0.25 s at first, then every hundredth of the time elapsed
(at most every second): each answer costs the API 6-17 ms of CPU here, which the import
being measured would otherwise have.
For an upload, the file is sent to the presigned form first, untimed; the worker's fetch
from object storage is inside the time.
"""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from psycopg2 import sql

from bench.methods import LIVE, UPLOAD, Timed, Trial
from bench.pg import Cluster
from bench.sampling import PeakSampler
from pipeline.config import Settings
from pipeline.import_steps import restore_role_name
from stages.database.spares import SPARE_PREFIX

if TYPE_CHECKING:
    from tests.support.processes import Service

POLL_SECONDS = 0.25
POLL_SHARE = 0.01  # of the time elapsed: the longest a poll comes after the job ends (polled_s)
POLL_MAX_SECONDS = 1.0
JOB_TIMEOUT_SECONDS = 4 * 3600
# How long the bench waits for the worker's work after a job (ServiceBench._settled).
SETTLE_TIMEOUT_SECONDS = 60


class ServiceFailed(RuntimeError):
    """The service's import did not complete (its job failed, was cancelled, or hung)."""


@dataclass(frozen=True)
class Project:
    id: str
    database: str
    key: str


class ServiceBench:
    """A running private instance of the service (see `running_service`)."""

    def __init__(self, service: Service, settings: Settings, cluster: Cluster, org_id: str):
        self.service, self.settings, self.cluster, self.org_id = service, settings, cluster, org_id
        self.projects = 0

    def cli(self, *args: str) -> dict:
        from tests.support.processes import cli

        return cli(self.service.env, *args)

    def new_project(self) -> Project:
        self.projects += 1
        project = self.cli("projects", "create", "--org", self.org_id, "--name", f"bench {self.projects}")
        key = self.cli("keys", "create", "--org", self.org_id, "--project", project["id"], "--name", "bench")
        return Project(project["id"], project["database_name"], key["key"])

    def drop_project_databases(self, project: Project) -> None:
        """The project's database and any database the import left beside it."""
        for (name,) in self.cluster.query(
            "SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE %s",
            (project.database, project.database + "\\_replaced\\_%"),
        ):
            self.cluster.drop(name)

    def _auth(self, project: Project) -> dict[str, str]:
        return {"Authorization": f"Bearer {project.key}"}

    def upload(self, project: Project, dump_file: Path) -> str:
        """Send `dump_file` to a new upload of `project` (as `curl -F` does); its object key."""
        resp = requests.post(
            f"{self.service.base_url}/v1/projects/{project.id}/imports/uploads",
            headers=self._auth(project),
            timeout=30,
        )
        if resp.status_code != 201:
            raise ServiceFailed(f"creating an upload answered {resp.status_code}: {resp.text[:500]}")
        upload = resp.json()["upload"]
        # curl streams the file; requests would hold all of it in memory.
        argv = ["curl", "--silent", "--show-error", "--fail"]
        for name, value in upload["fields"].items():
            argv += ["--form-string", f"{name}={value}"]
        argv += ["--form", f"file=@{dump_file};type=application/octet-stream", upload["upload_url"]]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceFailed(f"uploading {dump_file.name} failed: {done.stderr.strip()[:500]}")
        return str(upload["object_key"])

    def run_import(self, project: Project, body: dict[str, Any]) -> Timed:
        """POST the import, wait for `completed`; the time and the peaks sampled meanwhile."""
        masters = [process.pid for process in self.service.workers.values()]
        with PeakSampler(masters, Path(self.settings.work_dir)) as peaks:
            started = time.monotonic()
            sent_at = dt.datetime.now(dt.UTC)
            resp = requests.post(
                f"{self.service.base_url}/v1/projects/{project.id}/imports",
                json={"confirm": True, **body},
                headers=self._auth(project),
                timeout=60,
            )
            if resp.status_code != 202:
                raise ServiceFailed(f"POST …/imports answered {resp.status_code}: {resp.text[:500]}")
            job_id = resp.json()["job"]["id"]
            try:
                job = self._wait(project, job_id)
            except BaseException:
                # The next method must not run beside an import still going on.
                self._cancel(project, job_id)
                raise
            polled = time.monotonic() - started
        if job["state"] != "completed":
            raise ServiceFailed(
                f"the import {job['id']} ended {job['state']}: {job.get('error')}; "
                f"stderr: {(job.get('last_stderr') or '')[-800:]}"
            )
        seconds, timed_by = completion_seconds(job, sent_at, polled)
        if timed_by != "completed_at":
            print(
                f"  (the job's completed_at could not be used: {job['id']} is timed to the poll that saw it)"
            )
        self._settled(job["id"])
        extra = {
            **peaks.as_dict(),
            "timed_by": timed_by,
            "polled_s": round(polled, 3),
            "job_id": job["id"],
            "attempts": job.get("attempts"),
            **_server_times(job),
            "stage_s": self._stage_seconds(job_id),
        }
        return Timed(
            seconds, project.database, extra=extra, cleanup=lambda: self.drop_project_databases(project)
        )

    def _settled(self, job_id: str, timeout: float = SETTLE_TIMEOUT_SECONDS) -> None:
        """Wait, untimed, for what the worker does after it completes a job (drops the
        import's restore role, makes the cluster's spare databases again): nobody waits
        for it, but the next method's round would run beside it. Gives up after
        `timeout` with a line saying so."""
        role = restore_role_name(job_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            (spares, roles) = self.cluster.query(
                "SELECT (SELECT count(*) FROM pg_database WHERE starts_with(datname, %s)),"
                " (SELECT count(*) FROM pg_roles WHERE rolname = %s)",
                (SPARE_PREFIX, role),
            )[0]
            if spares >= self.settings.spare_databases and roles == 0:
                return
            time.sleep(0.1)
        print(f"  (the worker had not finished after the import {job_id} within {timeout:.0f} s; going on)")

    def _stage_seconds(self, job_id: str) -> dict[str, float]:
        """Seconds from each stage's claim to the next event of the job (its end), from
        the job's events in the instance's control database: where the time went."""
        import psycopg2

        with psycopg2.connect(self.settings.database_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT at, reason FROM job_events WHERE job_id = %s ORDER BY id", (job_id,))
            events = cur.fetchall()
        conn.close()
        seconds: dict[str, float] = {}
        claims = [(at, reason.split(" ", 1)[0]) for at, reason in events if " claimed" in reason]
        ends = [at for at, _stage in claims[1:]] + ([events[-1][0]] if events else [])
        for (at, stage), end in zip(claims, ends, strict=True):
            # From a stage's claim to the next claim (or the job's last event): the hop included.
            seconds[stage] = round(seconds.get(stage, 0.0) + (end - at).total_seconds(), 3)
        if events:
            claimed = next((at for at, reason in events if " claimed" in reason), events[0][0])
            seconds["before first claim"] = round((claimed - events[0][0]).total_seconds(), 3)
        return seconds

    def _wait(self, project: Project, job_id: str, timeout: float = JOB_TIMEOUT_SECONDS) -> dict:
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            resp = requests.get(
                f"{self.service.base_url}/v1/jobs/{job_id}", headers=self._auth(project), timeout=30
            )
            if resp.status_code == 429:  # the instance's limit is raised, but never poll faster than told
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            if resp.status_code != 200:
                raise ServiceFailed(f"GET /v1/jobs/{job_id} answered {resp.status_code}: {resp.text[:500]}")
            job = resp.json()["job"]
            if job["state"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(poll_interval(time.monotonic() - started))
        raise ServiceFailed(f"the import {job_id} did not finish within {timeout:.0f} s")

    def _cancel(self, project: Project, job_id: str) -> None:
        """Cancel `job_id` and wait (a while) for it to stop; best effort, on the way out of a failure."""
        try:
            requests.post(
                f"{self.service.base_url}/v1/jobs/{job_id}/cancel", headers=self._auth(project), timeout=30
            )
            self._wait(project, job_id, timeout=300)
        except (requests.RequestException, ServiceFailed):
            pass  # the failure being raised says more than this one


def poll_interval(elapsed: float) -> float:
    """Seconds until the next poll of a job `elapsed` seconds after the POST (see the
    module's docstring)."""
    return min(POLL_MAX_SECONDS, max(POLL_SECONDS, elapsed * POLL_SHARE))


def completion_seconds(job: dict, sent_at: dt.datetime, polled: float) -> tuple[float, str]:
    """Seconds from sending the POST (`sent_at`) to the job's `completed_at` (see the
    module docstring). The poll's time (`polled`) bounds it from above: a completion
    time that is missing, unreadable, not after the POST or later than the poll (a
    clock stepped meanwhile) is not trusted, and the poll's time is the answer.
    Returns the seconds and what timed them: "completed_at" or "poll"."""
    try:
        completed = dt.datetime.fromisoformat(job["completed_at"])
    except (KeyError, TypeError, ValueError):
        return polled, "poll"
    if completed.tzinfo is None:
        return polled, "poll"
    seconds = (completed - sent_at).total_seconds()
    return (seconds, "completed_at") if 0 < seconds <= polled else (polled, "poll")


def _server_times(job: dict) -> dict[str, float]:
    """The job's own clock: from its creation (the POST) and from its first claim to completion.

    A cross-check of the bench's time, which starts before the POST reaches the API.
    """
    try:
        created, completed = (dt.datetime.fromisoformat(job[k]) for k in ("created_at", "completed_at"))
        started = dt.datetime.fromisoformat(job["started_at"]) if job.get("started_at") else created
    except (KeyError, TypeError, ValueError):
        return {}
    return {
        "server_s": round((completed - created).total_seconds(), 3),
        "server_from_claim_s": round((completed - started).total_seconds(), 3),
    }


class ServiceLive:
    """The service importing from the source's URL."""

    name, label, mode = "service", "the service, live URL, POST to completed", LIVE

    def __init__(self, bench: ServiceBench):
        self.bench = bench

    def run(self, trial: Trial) -> Timed:
        project = self.bench.new_project()
        try:
            return self.bench.run_import(
                project, {"source_url": trial.cluster.url(trial.source, sslmode="disable")}
            )
        except BaseException:
            self.bench.drop_project_databases(project)
            raise


class ServiceUpload:
    """The service importing the source's `-Fc` file, uploaded first (untimed)."""

    name, label, mode = "service-upload", "the service, the same -Fc uploaded, POST to completed", UPLOAD

    def __init__(self, bench: ServiceBench):
        self.bench = bench

    def run(self, trial: Trial) -> Timed:
        assert trial.dump_file is not None, "upload methods need the source's -Fc file"
        project = self.bench.new_project()
        try:
            key = self.bench.upload(project, trial.dump_file)
            return self.bench.run_import(project, {"upload_key": key})
        except BaseException:
            self.bench.drop_project_databases(project)
            raise


@contextmanager
def running_service(cluster: Cluster, base: Path, *, concurrency: int = 2) -> Iterator[ServiceBench]:
    """Start a private instance of the service under `base` (see the module docstring)."""
    from tests.support.processes import cli, service_env, start_service
    from tests.support.s3server import running_seaweedfs

    run_id = secrets.token_hex(3)
    with ExitStack() as stack:
        s3 = stack.enter_context(running_seaweedfs(base / "s3"))
        (base / "work").mkdir(parents=True, exist_ok=True)
        settings = Settings.from_env({"CAPY_ENV": "development"}).replace(
            s3_endpoint=s3.url,
            s3_public_endpoint=s3.url,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            s3_bucket=f"capybench-{run_id}",
            database_url=cluster.url(f"capybench_ctl_{run_id}"),
            queue_prefix=f"capybench_{run_id}",
            allow_private_sources=True,
            work_dir=str(base / "work"),
            concurrency=concurrency,
            secret_key="capybench-" + secrets.token_hex(24),
        )
        stack.callback(_clean_up, cluster, settings)
        env = service_env(settings)
        cli(env, "migrate")
        cli(env, "clusters", "add", "--name", "local", "--admin-url", cluster.admin_url)
        org = cli(env, "orgs", "create", "--name", "bench")
        # What a deployment's clock does within its first minute: the cluster's spare
        # databases (CAPY_SPARE_DATABASES) are made; each import then takes them and the
        # worker makes them again after it.
        cli(env, "sweep")
        # The bench polls a job up to four times a second, past the default per-key rate limit.
        service = start_service(settings, base / "logs", CAPY_RATE_LIMIT_PER_MINUTE="100000")
        stack.callback(service.stop)
        yield ServiceBench(service, settings, cluster, org["id"])


def _clean_up(cluster: Cluster, settings: Settings) -> None:
    """Drop every database, role and queue the instance made, then its control database."""
    control = settings.database_url.rsplit("/", 1)[1]
    if cluster.exists(control):
        made = {
            name
            for (name,) in cluster.query(
                "SELECT database_name FROM projects UNION SELECT database_name FROM retired_databases "
                "UNION SELECT preview_database_id FROM jobs WHERE preview_database_id IS NOT NULL",
                dbname=control,
            )
        }
        roles = cluster.query(
            "SELECT role_name FROM projects WHERE role_name IS NOT NULL "
            "UNION SELECT 'capy_restore_' || substr(id, 5) FROM jobs",
            dbname=control,
        )
        for (name,) in cluster.query("SELECT datname FROM pg_database"):
            if (
                name in made
                or any(name.startswith(m + "_replaced_") for m in made)
                or name.startswith(SPARE_PREFIX)
            ):
                cluster.drop(name)
        cluster.drop(control)
        for (role,) in roles:
            cluster.query(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    from tests.support.broker import delete_queues

    delete_queues(settings.broker_url, [settings.queue_prefix])
