"""`capy-imports sweep`: the housekeeping that time makes due.

- uploads of ended jobs whose retention (CAPY_UPLOAD_RETENTION_SECONDS) has passed are
  deleted from storage;
- uploads whose form expired unused (plus CAPY_UPLOAD_UNUSED_GRACE_SECONDS) are deleted;
- every object under `imports/` that neither an unused upload nor a job (active, or
  ended within the retention) holds is deleted: an upload posted again after its job
  ended, or an object nobody issued;
- databases replaced by an import are dropped once their `drop_after` has passed;
- previews of ended jobs that are still on a cluster (a worker died while cleaning
  up) are dropped;
- restore roles (`capy_restore_…`) of ended jobs are dropped, after their previews;
- schema-rehearsal databases and roles (`capy_rehearsal_<time>_…`) older than an hour
  (a process killed while rehearsing) are dropped;
- each cluster's spare databases (`capy_spare_…`) are made or dropped until it holds
  CAPY_SPARE_DATABASES (pipeline.spares);
- projects' live and retained databases that still admit other roles (made before the
  service revoked PUBLIC's access) are locked down, and those left refusing connections
  (a worker that died inside a swap, before swaps became one transaction) reopened;
- the reaper: running jobs whose claim's heartbeat is older than the lease (their worker
  died), running jobs left unclaimed between stages for long (a wake-up lost with its
  worker) and pending jobs whose first message was never published are woken again;
- work directories of ended (or unknown) jobs left in CAPY_WORK_DIR are removed.
Each action is idempotent (a wake-up that finds the job claimed does nothing); the
summary says what was done.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import psycopg2

from pipeline import jobs, spares
from pipeline.accounts import cluster_admin
from pipeline.config import Settings
from pipeline.import_steps import RESTORE_ROLE_PREFIX
from pipeline.models import (
    ACTIVE_STATES,
    FINAL_STATES,
    Cluster,
    Job,
    Project,
    RetiredDatabase,
    Upload,
    utcnow,
)
from pipeline.sealing import Sealer
from stages.database.cluster import ClusterAdmin
from stages.errors import CapyError, ObjectMissing
from stages.preflight.sandbox import REHEARSAL_PREFIX, is_stale
from stages.storage import KEY_PREFIX, ObjectStore

LIST_PAGE = 500
# A pending job this old with nothing after its creation was never published.
UNPUBLISHED_AFTER = dt.timedelta(minutes=1)
# A running job unclaimed this long between stages lost its wake-up (Dramatiq's retry
# backoff is at most 5 minutes; the fair-share wait touches the job every 30 s).
UNCLAIMED_AFTER = dt.timedelta(minutes=10)

Wake = Callable[..., None]

log = logging.getLogger(__name__)

# One item sweep cannot clean is reported and skipped: it must not stop the others
# (a database error of a cluster as much as our own errors).
_CLEANUP_ERRORS = (CapyError, psycopg2.Error)


def _why(err: Exception) -> str:
    if isinstance(err, CapyError):
        return err.message
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def sweep(
    settings: Settings,
    sealer: Sealer,
    store: ObjectStore,
    *,
    wake: Wake | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
) -> dict[str, Any]:
    """Do what is due; with `wake` (StageQueue.wake) also re-wake stuck jobs."""
    now = clock()
    done: dict[str, Any] = {
        "jobs_woken": [],
        "work_dirs_removed": [],
        "databases_reopened": [],
        "uploads_deleted": [],
        "replaced_databases_dropped": [],
        "previews_dropped": [],
        "restore_roles_dropped": [],
        "rehearsals_dropped": [],
        "spares_made": [],
        "spares_dropped": [],
        "databases_locked_down": [],
        "errors": [],
    }
    if wake is not None:
        reap(settings, wake, now, done)
    _remove_work_dirs(settings, done)
    retention = dt.timedelta(seconds=max(0, settings.upload_retention_seconds))
    for job in Job.select().where(
        Job.upload_key.is_null(False) & Job.state.in_(FINAL_STATES) & (Job.completed_at <= now - retention)
    ):
        if job.facts.upload_deleted or job.upload_key is None:  # (never None: the query)
            continue
        try:
            store.delete(job.upload_key)
        except ObjectMissing:
            pass
        except _CLEANUP_ERRORS as err:
            done["errors"].append(f"upload {job.upload_key}: {_why(err)}")
            continue
        jobs.mark_upload_deleted(job.id)
        _mark_deleted(job.upload_key, now)
        done["uploads_deleted"].append(job.upload_key)
    _sweep_unused_uploads(settings, store, now, done)
    _sweep_orphaned_objects(settings, store, now, retention, done)
    for retired in RetiredDatabase.select().where(
        RetiredDatabase.dropped_at.is_null() & (RetiredDatabase.drop_after <= now)
    ):
        try:
            cluster_admin(Cluster.get_by_id(retired.cluster_id), sealer).drop_database(retired.database_name)
        except _CLEANUP_ERRORS as err:
            done["errors"].append(f"database {retired.database_name}: {_why(err)}")
            continue
        RetiredDatabase.update(dropped_at=now).where(RetiredDatabase.id == retired.id).execute()
        done["replaced_databases_dropped"].append(retired.database_name)
    for job in Job.select().where(
        Job.preview_database_id.is_null(False) & Job.state.in_(FINAL_STATES) & (Job.state != "completed")
    ):
        if job.preview_database_id is None:  # (never: the query)
            continue
        admin = cluster_admin(Cluster.get_by_id(job.cluster_id), sealer)
        try:
            if admin.database_exists(job.preview_database_id):
                admin.drop_database(job.preview_database_id)
                done["previews_dropped"].append(job.preview_database_id)
        except _CLEANUP_ERRORS as err:
            done["errors"].append(f"preview {job.preview_database_id}: {_why(err)}")
    for cluster in Cluster.select():
        admin = cluster_admin(cluster, sealer)
        _drop_restore_roles(admin, done)
        _drop_stale_rehearsals(admin, now.timestamp(), done)
        _keep_spares(admin, settings.spare_databases, done)
        _lock_down_project_databases(cluster, admin, done)
    return done


def stuck_jobs(settings: Settings, now: dt.datetime) -> list[tuple[Job, str]]:
    """Active jobs nothing will move unless woken, each with why."""
    lease = dt.timedelta(seconds=settings.lease_seconds)
    found: list[tuple[Job, str]] = []
    # updated_at: the reaper touches what it wakes, so a job whose worker is still
    # down is woken once per lease, not at every round.
    stale = Job.select().where(
        (Job.state == "running")
        & Job.claimed_by.is_null(False)
        & (Job.heartbeat_at < now - lease)
        & (Job.updated_at < now - lease)
    )
    found += [
        (job, f"the claim of {job.claimed_by} went stale at {job.heartbeat_at:%H:%M:%S}") for job in stale
    ]
    unclaimed = Job.select().where(
        (Job.state == "running") & Job.claimed_by.is_null() & (Job.updated_at < now - UNCLAIMED_AFTER)
    )
    found += [(job, f"unclaimed since {job.updated_at:%H:%M:%S}") for job in unclaimed]
    # Pending (never claimed since it was created or retried) and unchanged for a
    # minute: its wake-up was not published, or was lost.
    unpublished = Job.select().where(
        (Job.state == "pending") & Job.claimed_by.is_null() & (Job.updated_at < now - UNPUBLISHED_AFTER)
    )
    found += [(job, "pending and never picked up") for job in unpublished]
    return found


def reap(settings: Settings, wake: Wake, now: dt.datetime, done: dict[str, Any]) -> None:
    """Wake the stage of every stuck job. A duplicate wake-up is harmless: the claim is
    a guarded update, and a message that finds a live claim only looks again later."""
    for job, why in stuck_jobs(settings, now):
        try:
            wake(job.id, job.stage)
        except _CLEANUP_ERRORS as err:
            done["errors"].append(f"waking {job.id}: {_why(err)}")
            continue
        Job.update(updated_at=now).where((Job.id == job.id) & (Job.updated_at == job.updated_at)).execute()
        log.info("woke job %s (%s): %s", job.id, job.stage, why)
        done["jobs_woken"].append({"job": job.id, "stage": job.stage, "why": why})


def _remove_work_dirs(settings: Settings, done: dict[str, Any]) -> None:
    """Work directories (CAPY_WORK_DIR/job_…) of jobs that ended, or that this control
    database does not know, left by a worker that died."""
    try:
        names = [n for n in os.listdir(settings.work_dir) if n.startswith("job_")]
    except FileNotFoundError:
        return
    if not names:
        return
    active = {j.id for j in Job.select(Job.id).where(Job.id.in_(names) & Job.state.in_(ACTIVE_STATES))}
    known = {j.id for j in Job.select(Job.id).where(Job.id.in_(names))}
    for name in names:
        if name in active or (name not in known and not _old_enough(os.path.join(settings.work_dir, name))):
            continue
        shutil.rmtree(os.path.join(settings.work_dir, name), ignore_errors=True)
        done["work_dirs_removed"].append(name)


def _old_enough(path: str, *, age: dt.timedelta = dt.timedelta(days=1)) -> bool:
    """An unknown job's directory may belong to another deployment sharing the
    directory, or to a job being created: only a day-old one is removed."""
    try:
        return utcnow().timestamp() - os.path.getmtime(path) > age.total_seconds()
    except OSError:
        return False


def _grace(settings: Settings) -> dt.timedelta:
    return dt.timedelta(seconds=max(0, settings.upload_unused_grace_seconds))


def _mark_deleted(key: str, now: dt.datetime) -> None:
    Upload.update(deleted_at=now).where((Upload.object_key == key) & Upload.deleted_at.is_null()).execute()


def _delete(store: ObjectStore, key: str, now: dt.datetime, done: dict[str, Any]) -> None:
    try:
        store.delete(key)
    except _CLEANUP_ERRORS as err:
        done["errors"].append(f"upload {key}: {_why(err)}")
        return
    _mark_deleted(key, now)
    if key not in done["uploads_deleted"]:
        done["uploads_deleted"].append(key)


def _sweep_unused_uploads(
    settings: Settings, store: ObjectStore, now: dt.datetime, done: dict[str, Any]
) -> None:
    """Uploads nobody imported before their form expired (and the grace after it)."""
    expired = Upload.select().where(
        Upload.job.is_null() & Upload.deleted_at.is_null() & (Upload.expires_at <= now - _grace(settings))
    )
    for upload in expired:
        if _held_by_active_job([upload.object_key]):
            continue
        _delete(store, upload.object_key, now, done)
        log.info("deleted upload %s: its form expired unused at %s", upload.object_key, upload.expires_at)


def _sweep_orphaned_objects(
    settings: Settings, store: ObjectStore, now: dt.datetime, retention: dt.timedelta, done: dict[str, Any]
) -> None:
    """Objects under imports/ that nothing may still read: no unused upload whose form
    (plus grace) is valid, no active job, no ended job within the retention."""
    page: list[str] = []
    try:
        for found in store.list(f"{KEY_PREFIX}/"):
            page.append(found.key)
            if len(page) >= LIST_PAGE:
                _sweep_page(settings, store, page, now, retention, done)
                page = []
    except ObjectMissing:
        pass  # no bucket yet (a deployment's first minute): nothing was ever uploaded
    except _CLEANUP_ERRORS as err:
        done["errors"].append(f"listing {KEY_PREFIX}/: {_why(err)}")
    if page:
        _sweep_page(settings, store, page, now, retention, done)


def _sweep_page(
    settings: Settings,
    store: ObjectStore,
    keys: list[str],
    now: dt.datetime,
    retention: dt.timedelta,
    done: dict[str, Any],
) -> None:
    unused = Upload.select(Upload.object_key).where(
        Upload.object_key.in_(keys)
        & Upload.job.is_null()
        & Upload.deleted_at.is_null()
        & (Upload.expires_at > now - _grace(settings))
    )
    retained = Job.select(Job.upload_key).where(
        Job.upload_key.in_(keys) & Job.state.in_(FINAL_STATES) & (Job.completed_at > now - retention)
    )
    held = {u.object_key for u in unused} | _held_by_active_job(keys) | {j.upload_key for j in retained}
    for key in keys:
        if key not in held:
            _delete(store, key, now, done)
            log.info("deleted %s: no unused upload or job holds it", key)


def _held_by_active_job(keys: list[str]) -> set[str]:
    rows = Job.select(Job.upload_key).where(Job.upload_key.in_(keys) & Job.state.in_(ACTIVE_STATES))
    return {j.upload_key for j in rows if j.upload_key is not None}


def _lock_down_project_databases(cluster: Cluster, admin: ClusterAdmin, done: dict[str, Any]) -> None:
    """Projects' live and retained databases made before the service revoked PUBLIC's
    CONNECT and TEMPORARY (or opened since) admit only their owner again."""
    names = [
        p.database_name for p in Project.select(Project.database_name).where(Project.cluster == cluster.id)
    ]
    names += [
        r.database_name
        for r in RetiredDatabase.select(RetiredDatabase.database_name).where(
            (RetiredDatabase.cluster == cluster.id) & RetiredDatabase.dropped_at.is_null()
        )
    ]
    try:
        done["databases_locked_down"] += admin.lock_down_open(names)
        done["databases_reopened"] += admin.reopen_disabled(names)
    except _CLEANUP_ERRORS as err:
        done["errors"].append(f"locking down the databases of cluster {cluster.name}: {_why(err)}")


def _drop_restore_roles(admin: ClusterAdmin, done: dict[str, Any]) -> None:
    """Drop the restore roles of this deployment's ended jobs. A role whose job is still
    active, or unknown here (another deployment sharing the cluster), is left alone."""
    try:
        roles = admin.roles_like(RESTORE_ROLE_PREFIX)
    except _CLEANUP_ERRORS as err:
        done["errors"].append(f"restore roles: {_why(err)}")
        return
    for role in roles:
        job = Job.get_or_none(Job.id == "job_" + role.removeprefix(RESTORE_ROLE_PREFIX))
        if job is None or job.state not in FINAL_STATES:
            continue
        try:
            admin.drop_role(role)
        except _CLEANUP_ERRORS as err:
            done["errors"].append(f"role {role}: {_why(err)}")
            continue
        done["restore_roles_dropped"].append(role)


def _keep_spares(admin: ClusterAdmin, count: int, done: dict[str, Any]) -> None:
    """Make or drop the cluster's spare databases until it holds `count`."""
    try:
        made, dropped = spares.keep(admin, count)
    except _CLEANUP_ERRORS as err:
        done["errors"].append(f"spare databases: {_why(err)}")
        return
    done["spares_made"] += made
    done["spares_dropped"] += dropped


def _drop_stale_rehearsals(admin: ClusterAdmin, now: float, done: dict[str, Any]) -> None:
    """Drop the schema-rehearsal databases and roles a killed preflight left behind
    (their names carry their creation time; a live rehearsal is never that old)."""
    try:
        with admin.autocommit() as cur:
            cur.execute(
                "SELECT datname FROM pg_catalog.pg_database "
                "WHERE pg_catalog.left(datname::text, %s) OPERATOR(pg_catalog.=) %s ORDER BY 1",
                (len(REHEARSAL_PREFIX), REHEARSAL_PREFIX),
            )
            databases = [name for (name,) in cur.fetchall()]
        roles = admin.roles_like(REHEARSAL_PREFIX)
    except _CLEANUP_ERRORS as err:
        done["errors"].append(f"rehearsals: {_why(err)}")
        return
    for name in sorted(set(databases) | set(roles)):
        if not is_stale(name, now):
            continue
        try:
            admin.drop_database(name)  # first: the role owns it
            admin.drop_role(name)
        except _CLEANUP_ERRORS as err:
            done["errors"].append(f"rehearsal {name}: {_why(err)}")
            continue
        done["rehearsals_dropped"].append(name)
