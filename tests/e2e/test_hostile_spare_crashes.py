"""Hostile review of spare databases with real processes: a worker keeping spares
(CAPY_SPARE_DATABASES=2) killed while a job's preview (taken from a spare) is being
restored; the job must end `completed` by itself, nothing of it left, and a sweep puts
the cluster's spares back at two."""

from __future__ import annotations

import signal

import pytest

from pipeline.sealing import Sealer
from pipeline.sweep import sweep
from tests.e2e.test_crash_recovery import (
    _assert_recovered,
    _start,
    _tenant,
    _wait_for_end,
    _wait_for_hold,
    _worker_env,
)
from tests.support import pg
from tests.support.processes import migrated_with_local_cluster, start_service


@pytest.fixture(scope="module")
def deployment(control_db):
    control_db = control_db.replace(queue_prefix=control_db.queue_prefix + "_hspare", spare_databases=2)
    migrated_with_local_cluster(control_db)
    pg.drop_spares()
    yield control_db
    pg.drop_spares()


@pytest.mark.e2e
@pytest.mark.parametrize("point", ["fetch", "restore"])
def test_a_worker_killed_with_spares_on_leaves_nothing(deployment, store, corpus_source, tmp_path, point):
    source = corpus_source("northwind")
    service = start_service(deployment, tmp_path / "svc", workers=2, worker_env=_worker_env(point))
    try:
        done = sweep(deployment, Sealer(deployment.secret_key), store)
        assert len(pg.spare_names()) == 2, done
        tenant = _tenant(service.env)
        live = tenant["project"]["database_name"]
        job_id = _start(service, tenant, source)
        held = _wait_for_hold(service, tenant, job_id, point)
        holder = service.worker_holding(int(held["claimed_by"].split(":")[1]))
        service.kill(holder, signal.SIGKILL)
        job = _wait_for_end([service], tenant, job_id)
        _assert_recovered(deployment, job, source, live)
    finally:
        service.stop()
    sweep(deployment, Sealer(deployment.secret_key), store)
    assert len(pg.spare_names()) == 2
    # The job's preview and restore role are gone. (A rehearsal's database or role that the
    # killed worker was still dropping in the background is the sweep's, an hour later:
    # tests/integration/test_rehearsal_cleanup.py.)
    suffix = job_id.removeprefix("job_")
    left = pg.admin(
        "SELECT datname FROM pg_database WHERE datname = %s UNION ALL SELECT rolname FROM pg_roles WHERE rolname = %s",
        ("capy_preview_" + suffix, "capy_restore_" + suffix),
    )
    assert left == []
    [(acl, allow)] = pg.admin(
        "SELECT replace(datacl::text, pg_get_userbyid(datdba), 'OWNER'), datallowconn FROM pg_database WHERE datname = %s",
        (live,),
    )
    assert acl == "{OWNER=CTc/OWNER}" and allow
