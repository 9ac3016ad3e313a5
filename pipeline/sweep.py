"""`capy-imports sweep`: the housekeeping that time makes due.

- uploads of ended jobs whose retention (CAPY_UPLOAD_RETENTION_SECONDS) has passed are
  deleted from storage;
- databases replaced by an import are dropped once their `drop_after` has passed;
- previews of ended jobs that are still on a cluster (a worker died while cleaning
  up) are dropped;
- restore roles (`capy_restore_…`) of ended jobs are dropped, after their previews.
Each action is idempotent; the summary says what was done.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from pipeline.accounts import cluster_admin
from pipeline.config import Settings
from pipeline.import_steps import RESTORE_ROLE_PREFIX
from pipeline.models import FINAL_STATES, Cluster, Job, RetiredDatabase, utcnow
from pipeline.sealing import Sealer
from stages.cluster import ClusterAdmin
from stages.errors import CapyError, ObjectMissing
from stages.storage import ObjectStore

log = logging.getLogger(__name__)


def sweep(
    settings: Settings, sealer: Sealer, store: ObjectStore, *, clock: Callable[[], dt.datetime] = utcnow
) -> dict[str, Any]:
    now = clock()
    done: dict[str, Any] = {
        "uploads_deleted": [],
        "replaced_databases_dropped": [],
        "previews_dropped": [],
        "restore_roles_dropped": [],
        "errors": [],
    }
    retention = dt.timedelta(seconds=max(0, settings.upload_retention_seconds))
    for job in Job.select().where(
        Job.upload_key.is_null(False) & Job.state.in_(FINAL_STATES) & (Job.completed_at <= now - retention)
    ):
        if job.facts.get("upload_deleted"):
            continue
        try:
            store.delete(job.upload_key)
        except ObjectMissing:
            pass
        except CapyError as err:
            done["errors"].append(f"upload {job.upload_key}: {err.message}")
            continue
        Job.update(facts={**job.facts, "upload_deleted": True}).where(Job.id == job.id).execute()
        done["uploads_deleted"].append(job.upload_key)
    for retired in RetiredDatabase.select().where(RetiredDatabase.dropped_at.is_null() & (RetiredDatabase.drop_after <= now)):
        try:
            cluster_admin(Cluster.get_by_id(retired.cluster_id), sealer).drop_database(retired.database_name)
        except CapyError as err:
            done["errors"].append(f"database {retired.database_name}: {err.message}")
            continue
        RetiredDatabase.update(dropped_at=now).where(RetiredDatabase.id == retired.id).execute()
        done["replaced_databases_dropped"].append(retired.database_name)
    for job in Job.select().where(
        Job.preview_database_id.is_null(False) & Job.state.in_(FINAL_STATES) & (Job.state != "completed")
    ):
        admin = cluster_admin(Cluster.get_by_id(job.cluster_id), sealer)
        try:
            if admin.database_exists(job.preview_database_id):
                admin.drop_database(job.preview_database_id)
                done["previews_dropped"].append(job.preview_database_id)
        except CapyError as err:
            done["errors"].append(f"preview {job.preview_database_id}: {err.message}")
    for cluster in Cluster.select():
        _drop_restore_roles(cluster_admin(cluster, sealer), done)
    return done


def _drop_restore_roles(admin: ClusterAdmin, done: dict[str, Any]) -> None:
    """Drop the restore roles of this deployment's ended jobs. A role whose job is still
    active, or unknown here (another deployment sharing the cluster), is left alone."""
    try:
        roles = admin.roles_like(RESTORE_ROLE_PREFIX)
    except CapyError as err:
        done["errors"].append(f"restore roles: {err.message}")
        return
    for role in roles:
        job = Job.get_or_none(Job.id == "job_" + role.removeprefix(RESTORE_ROLE_PREFIX))
        if job is None or job.state not in FINAL_STATES:
            continue
        try:
            admin.drop_role(role)
        except CapyError as err:
            done["errors"].append(f"role {role}: {err.message}")
            continue
        done["restore_roles_dropped"].append(role)
