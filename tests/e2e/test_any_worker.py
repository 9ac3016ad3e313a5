"""End to end: two worker processes, each with a CAPY_WORK_DIR of its own (two hosts, as
far as local disk goes), import several projects at once; every stage of every import
is free to land on either worker (issue 11, item 4: any worker on any host runs any
stage), and then with the workers taking alternate stages, so that every stage runs on
the other worker than the one before it. Each import must complete with the source's
rows, and leave nothing in either work directory.

Uploads pass since the upload stages stopped sharing files (pipeline.steps.upload).
Live imports are in a test function of their own: they pass once the live path no
longer dumps to the fetch worker's disk for the restore to read (the copy engine).
"""

from __future__ import annotations

import os

import pytest
import requests

from pipeline import jobs
from pipeline.models import Job
from pipeline.steps.registry import STAGE_NAMES
from tests.support import pg
from tests.support.processes import cli, migrated_with_local_cluster, start_service, wait_for_job
from tests.support.uploading import post_file

WORKERS = ("worker", "worker2")
# (corpus, upload format): every format, more than one database.
UPLOADS = [
    ("pagila", "custom"),
    ("pagila", "tar"),
    ("pagila", "plain"),
    ("pagila", "gzip-plain"),
    ("chinook", "custom"),
    ("chinook", "plain"),
    ("northwind", "tar"),
    ("northwind", "gzip-plain"),
]
LIVE = ["pagila", "chinook", "northwind", "pagila"]


# Which stages each worker takes: any (RabbitMQ hands each message to either; its round
# robin tends to keep an import's stages on one worker), or alternating, so that every
# stage runs on the other worker than the stage before it.
ALTERNATING = {stage: WORKERS[index % 2] for index, stage in enumerate(STAGE_NAMES)}
PLACEMENTS = {
    "free": {"worker": (), "worker2": ()},
    "alternating": {
        name: (*(stage for stage, worker in ALTERNATING.items() if worker == name), "exhausted")
        for name in WORKERS
    },
}


@pytest.fixture(scope="module", params=list(PLACEMENTS))
def deployment(request, control_db, tmp_path_factory):
    """The web service and two workers with work directories of their own, on queues of
    this module's own (other e2e services' workers must not take its stages)."""
    settings = control_db.replace(queue_prefix=control_db.queue_prefix + "_anyworker")
    migrated_with_local_cluster(settings)
    service = start_service(settings, tmp_path_factory.mktemp(f"any-worker-logs-{request.param}"), workers=0)
    work = {name: tmp_path_factory.mktemp(f"work-{name}") for name in WORKERS}
    for name, stages in PLACEMENTS[request.param].items():
        queues = tuple(f"{settings.queue_prefix}.{stage}" for stage in stages)
        service.start_worker(name, queues=queues, CAPY_WORK_DIR=str(work[name]))
    yield service, work, request.param
    service.stop()


def _tenant(env: dict[str, str], name: str) -> dict:
    """An organization of its own per project, so the imports run at the same time."""
    org = cli(env, "orgs", "create", "--name", f"Any worker {name}")
    project = cli(env, "projects", "create", "--org", org["id"], "--name", name)
    key = cli(env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", name)
    return {"project": project, "key": key["key"]}


def _start(service, tenant: dict, body: dict) -> str:
    resp = requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports",
        json={"confirm": True, **body},
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job"]["id"]


def _upload(service, tenant: dict, data: bytes) -> str:
    resp = requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports/uploads",
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    upload = resp.json()["upload"]
    posted = post_file(upload, data)
    assert posted.status_code in (200, 201, 204), posted.text
    return upload["object_key"]


def _placement(service, job_id: str) -> dict[str, str]:
    """Which worker ran each stage of the job (its last claim of it)."""
    ran: dict[str, str] = {}
    for event in jobs.events(job_id):
        if event.reason.startswith(tuple(f"{stage} claimed" for stage in STAGE_NAMES)):
            pid = int(event.actor.split(":")[1])
            ran[event.reason.split(" ", 1)[0]] = service.worker_holding(pid)
    return ran


def _check(deployment, started: list[tuple[str, str, dict]]) -> None:
    """Every import completed with its source's rows and schema, its facts name no
    worker's file, and nothing is left in either work directory; with alternating
    workers, each stage ran on the other worker than the stage before it."""
    service, work, placement = deployment
    for job_id, source, tenant in started:
        job = wait_for_job(service, tenant["key"], job_id)
        ran = _placement(service, job_id)
        assert job["state"] == "completed", (source, ran, job["error"], job["last_stderr"])
        live = tenant["project"]["database_name"]
        assert pg.row_counts(live) == pg.row_counts(source), (source, ran)
        assert pg.schema_dump(live) == pg.schema_dump(source), (source, ran)
        # No stage hands a later one a path on its own disk (on another host it would
        # not be there, even where, as here, both workers share one file system).
        facts = Job.get_by_id(job_id).facts.model_dump_json()
        assert not [name for name, folder in work.items() if str(folder) in facts], (source, ran)
        if placement == "alternating":
            assert ran == ALTERNATING
    for name, folder in work.items():
        assert [entry for entry in os.listdir(folder) if entry.startswith("job_")] == [], name


@pytest.fixture(scope="module")
def dumps(corpus_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("any-worker-dumps")
    return {
        (corpus, fmt): (
            corpus_source(corpus),
            pg.make_dump(corpus_source(corpus), fmt, folder / f"{corpus}.{fmt}"),
        )
        for corpus, fmt in UPLOADS
    }


@pytest.mark.e2e
def test_uploads_run_on_either_worker(deployment, dumps):
    service = deployment[0]
    started = []
    for number, (corpus, fmt) in enumerate(UPLOADS):
        source, path = dumps[(corpus, fmt)]
        tenant = _tenant(service.env, f"upload-{number}")
        key = _upload(service, tenant, path.read_bytes())
        started.append((_start(service, tenant, {"upload_key": key}), source, tenant))
    _check(deployment, started)


@pytest.mark.e2e
def test_live_imports_run_on_either_worker(deployment, corpus_source):
    """Passes once live imports copy source to preview in the restore stage instead of
    restoring a dump the fetch stage left on its worker's disk."""
    service = deployment[0]
    started = []
    for number, corpus in enumerate(LIVE):
        source = corpus_source(corpus)
        tenant = _tenant(service.env, f"live-{number}")
        body = {"recreate": False, "source_url": pg.url_for(source, sslmode="disable")}
        started.append((_start(service, tenant, body), source, tenant))
    _check(deployment, started)
