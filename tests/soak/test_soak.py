"""Soak: 30 imports across 3 worker processes while a random worker is SIGKILLed every
few seconds (and started again, as a supervisor would).

Every job must end `completed` by itself, its live database holding the source and
accepting connections, with nothing left over (previews, restore roles, work
directories, tools); and its events must show that no stage ran twice at once: each
claim of a stage follows the end of the previous claim, or takes over a claim whose
worker had been killed before the takeover; no worker writes to a job it no longer
holds.

Run it with `make soak` (a few minutes); `make test` leaves it out.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import pytest
import requests

from pipeline.models import Job, JobEvent
from stages.tools.commands import LABEL_VARIABLE
from tests.support import pg
from tests.support.processes import cli, migrated_with_local_cluster, running_processes, start_service

pytestmark = pytest.mark.soak

IMPORTS = 30
WORKERS = 3
LEASE = "6"
SEED = int(os.environ.get("CAPY_SOAK_SEED", "20261129"))
# A random worker is killed every KILL_EVERY seconds (uniformly in this range).
KILL_EVERY = (1.5, 4.0)
_CLAIM = re.compile(r"^(\w+) claimed \(attempt \d+ of \d+\)(?:, taking over the stale claim of (\S+))?$")


@pytest.fixture(scope="module")
def deployment(control_db):
    settings = control_db.replace(queue_prefix=control_db.queue_prefix + "_soak")
    migrated_with_local_cluster(settings)
    return settings


class Killer(threading.Thread):
    """SIGKILLs a random worker's process group every few seconds and starts it again,
    remembering each killed process and when (a takeover must come after it)."""

    def __init__(self, service, rng: random.Random) -> None:
        super().__init__(name="soak-killer", daemon=True)
        self.service = service
        self.rng = rng
        self.killed: dict[int, float] = {}  # pid -> time.time() of its SIGKILL
        self.kills = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(*KILL_EVERY)):
            name = self.rng.choice(sorted(self.service.workers))
            process = self.service.workers[name]
            with self.lock:
                members = _group_members(process.pid)
                self.service.kill(name, signal.SIGKILL)
                now = time.time()
                for pid in members:
                    self.killed[pid] = now
                self.kills += 1
            process.wait()
            self.service.start_worker(name, CAPY_LEASE_SECONDS=LEASE)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def _tools_left(job_ids: list[str]) -> list[str]:
    """Any tool started for one of the jobs (LABEL_VARIABLE in its environment) that
    still runs on this host: not only the last one each job recorded, which a stage
    that ended well clears (jobs.advance)."""
    wanted = {f"{LABEL_VARIABLE}={job_id}".encode() for job_id in job_ids}
    left = []
    for pid, argv, env in running_processes(environment=True):
        labels = wanted.intersection(env)
        if labels:
            shown = b" ".join(argv).decode("utf-8", "replace")[:80]
            left.append(f"pid {pid} ({shown}) for {labels.pop().decode()}")
    return left


def _overlaps(job_id: str, killed: dict[int, float]) -> list[str]:
    """Where the events show a stage run by two claims at once (see the module doc)."""
    problems = []
    holder: str | None = None
    claims = 0
    for event in JobEvent.select().where(JobEvent.job == job_id).order_by(JobEvent.id):
        claim = _CLAIM.match(event.reason)
        is_worker = event.actor.count(":") == 2
        if claim:
            claims += 1
            taken_from = claim.group(2)
            if holder is not None:
                if taken_from != holder:
                    problems.append(f"{event.reason!r} by {event.actor} while {holder} held the stage")
                else:
                    pid = int(holder.split(":")[1])
                    if pid not in killed or killed[pid] > event.at.timestamp():
                        problems.append(f"{event.actor} took over from {holder}, which had not been killed")
            holder = event.actor
        elif is_worker and event.actor != holder:
            problems.append(f"{event.actor} wrote {event.reason!r} while {holder} held the job")
        elif event.actor == holder and (
            event.to_stage != event.from_stage
            or event.to_state != event.from_state
            or "will be retried" in event.reason
        ):
            holder = None  # the claim ended: advanced, completed, failed or released
    if claims < 4:  # one per stage at least: else these events are not what this reads
        problems.append(f"only {claims} claims recorded")
    return problems


# Up to 15 minutes for the imports to finish (below), after a deployment of three workers starts.
@pytest.mark.timeout(1800)
def test_imports_finish_correctly_while_workers_are_killed_at_random(deployment, corpus_source, tmp_path):
    rng = random.Random(SEED)
    sources = [corpus_source(name) for name in ("chinook", "northwind", "pagila")]
    service = start_service(
        deployment,
        tmp_path,
        workers=WORKERS,
        worker_env={"CAPY_LEASE_SECONDS": LEASE},
        CAPY_MAX_ATTEMPTS="8",
        CAPY_ORG_MAX_ACTIVE_JOBS="6",
    )
    killer = Killer(service, rng)
    started: list[tuple[str, str, str, str]] = []  # job, key, source, live database
    try:
        orgs = [cli(service.env, "orgs", "create", "--name", f"Soak org {n}") for n in range(3)]
        for number in range(IMPORTS):
            org = orgs[number % len(orgs)]
            project = cli(service.env, "projects", "create", "--org", org["id"], "--name", f"soak{number}")
            key = cli(
                service.env,
                "keys",
                "create",
                "--org",
                org["id"],
                "--project",
                project["id"],
                "--name",
                "soak",
            )
            source = sources[number % len(sources)]
            resp = requests.post(
                f"{service.base_url}/v1/projects/{project['id']}/imports",
                json={
                    "confirm": True,
                    "recreate": False,
                    "source_url": pg.url_for(source, sslmode="disable"),
                },
                headers={"Authorization": f"Bearer {key['key']}"},
                timeout=30,
            )
            assert resp.status_code == 202, resp.text
            started.append((resp.json()["job"]["id"], key["key"], source, project["database_name"]))
            if number == 2:
                killer.start()

        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            states = {Job.get_by_id(job_id).state for job_id, *_ in started}
            if not states & {"pending", "running"}:
                break
            time.sleep(2)
        killer.stop()
        print(f"\nsoak: {IMPORTS} imports, {WORKERS} workers, {killer.kills} SIGKILLs (seed {SEED})")

        failures = []
        for job_id, _key, source, live in started:
            job = Job.get_by_id(job_id)
            if job.state != "completed":
                failures.append(f"{job_id}: {job.state}: {job.error}")
                continue
            if pg.row_counts(live) != pg.row_counts(source):
                failures.append(f"{job_id}: {live} does not hold {source}")
            if pg.admin("SELECT datallowconn FROM pg_database WHERE datname = %s", (live,)) != [(True,)]:
                failures.append(f"{job_id}: {live} refuses connections")
            failures += [f"{job_id}: {p}" for p in _overlaps(job_id, killer.killed)]
        assert not failures, "\n".join(failures) + "\n" + service.log_tail()

        suffixes = [job_id.removeprefix("job_") for job_id, *_ in started]
        leftovers = [
            name
            for (name,) in pg.admin("SELECT datname FROM pg_database UNION ALL SELECT rolname FROM pg_roles")
            if any(name.endswith(suffix) for suffix in suffixes)
        ]
        assert leftovers == [], leftovers
        work_left = [
            job_id for job_id, *_ in started if os.path.exists(os.path.join(deployment.work_dir, job_id))
        ]
        assert work_left == [], work_left
        takeovers = (
            JobEvent.select()
            .where(
                JobEvent.job.in_([job_id for job_id, *_ in started]) & JobEvent.reason.contains("taking over")
            )
            .count()
        )
        print(f"soak: {takeovers} stale claims taken over; all {IMPORTS} jobs completed")
        assert killer.kills >= 10 and takeovers >= 1, (killer.kills, takeovers)
        assert _tools_left([job_id for job_id, *_ in started]) == []
    finally:
        killer.stop()
        service.stop()
