"""Dump uploads: presigned POST forms under the project's own prefix, and their checks.

Each form is recorded (`uploads` table) with the size it allows — the project's storage
limit when it was issued, enforced by S3 itself — and its expiry. The record is what
makes a key importable ("issued by us"), what limits how many unused forms a project
may hold, and what `capy-imports sweep` goes by to delete uploads nobody imported.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
import threading
from collections.abc import Callable
from typing import Any

import peewee

from pipeline import audit
from pipeline.db import database
from pipeline.errors import Conflict, InvalidRequest, NotFound, RateLimited
from pipeline.ids import new_id
from pipeline.models import Project, Upload, utcnow
from pipeline.principals import Principal
from pipeline.serialize import timestamp
from stages.errors import ObjectMissing
from stages.storage import ObjectStore, new_object_key, validate_object_key

DEFAULT_MAX_ACTIVE = 5


def unused(now: dt.datetime) -> peewee.Expression:
    """Uploads whose form still works and that no import has used yet."""
    return Upload.job.is_null() & Upload.deleted_at.is_null() & (Upload.expires_at > now)


class Uploads:
    def __init__(
        self,
        store: ObjectStore,
        *,
        expiry: dt.timedelta,
        max_active: int = DEFAULT_MAX_ACTIVE,
        unused_grace: dt.timedelta = dt.timedelta(hours=1),
        clock: Callable[[], dt.datetime] = utcnow,
        token: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self.store = store
        self.expiry = expiry
        self.max_active = max_active
        self.unused_grace = unused_grace
        self.clock = clock
        self.token = token
        self._bucket_ready = threading.Event()

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; done once per process."""
        if not self._bucket_ready.is_set():
            self.store.ensure_bucket()
            self._bucket_ready.set()

    def check_storage(self) -> None:
        """Readiness: storage answers now (asked every time, with short timeouts)."""
        self.store.check()
        self._bucket_ready.set()

    def create(self, project: Project, principal: Principal) -> dict[str, Any]:
        """A new object key and a presigned POST form for it, bounded by the project's
        storage limit; records the upload and the audit event.

        RateLimited when the project already holds `max_active` unused, unexpired forms.
        """
        self.ensure_bucket()
        key = new_object_key(project.id, self.token())
        now = self.clock()
        expires_at = now + self.expiry
        max_bytes = project.storage_limit_bytes
        with database.atomic():
            # Serialise issuance per project, so two requests cannot both take the last slot.
            Project.select(Project.id).where(Project.id == project.id).for_update().execute()
            active = list(
                Upload.select(Upload.expires_at)
                .where((Upload.project == project.id) & unused(now))
                .order_by(Upload.expires_at)
            )
            if len(active) >= self.max_active:
                oldest = active[0].expires_at if active else expires_at  # a limit of 0 refuses all
                wait = max(1, math.ceil((oldest - now).total_seconds()))
                raise RateLimited(
                    f"project {project.id} already has {len(active)} upload URLs that are neither used nor "
                    f"expired (at most {self.max_active}); import one of them, or try again in {wait} s "
                    "when the oldest expires",
                    retry_after=wait,
                )
            Upload.create(
                id=new_id("upl"),
                project=project.id,
                object_key=key,
                max_bytes=max_bytes,
                expires_at=expires_at,
                created_at=now,
            )
            # The form is a credential: the audit event records the key, never the form.
            audit.record(
                project,
                audit.IMPORT_UPLOAD_CREATED,
                principal.actor,
                target_id=key,
                details={"object_key": key, "max_bytes": max_bytes, "expires_at": timestamp(expires_at)},
            )
        form = self.store.presign_post(key, max_bytes=max_bytes, expires_at=expires_at)
        return {
            "object_key": key,
            "upload_url": form.url,
            "fields": form.fields,
            "method": "POST",
            "max_bytes": max_bytes,
            "expires_at": timestamp(expires_at),
        }

    @staticmethod
    def validate_key(key: str, project: Project) -> str:
        """The key, if it is an upload key of this project (InvalidObjectKey otherwise)."""
        return validate_object_key(key, project.id)

    def require_object(self, key: str, project: Project) -> int:
        """The uploaded object's size, for a key issued to `project`: InvalidRequest for a
        key we never issued, NotFound if nothing was uploaded there (or it was swept)."""
        upload = Upload.get_or_none((Upload.object_key == key) & (Upload.project == project.id))
        if upload is None:
            raise InvalidRequest(
                f"the upload key {key} was not issued for project {project.id}; create an upload with "
                f"POST /v1/projects/{project.id}/imports/uploads and use the object_key it returns"
            )
        if upload.deleted_at is not None:
            raise NotFound(
                f"the upload at {key} was deleted on {timestamp(upload.deleted_at)} (it was not imported "
                "before its upload URL expired, or its import ended); create a new upload"
            )
        if upload.job_id is None and upload.expires_at <= self.clock() - self.unused_grace:
            # `capy-imports sweep` deletes such uploads; refusing them closes the race.
            raise NotFound(
                f"the upload at {key} was not imported in time: its upload URL expired on "
                f"{timestamp(upload.expires_at)}; create a new upload"
            )
        try:
            return self.store.size(key)
        except ObjectMissing:
            raise NotFound(
                f"nothing has been uploaded at {key}; POST the dump to the upload_url with the upload's "
                "fields first (the form expires, create a new upload if it did)"
            ) from None


def mark_used(key: str, job_id: str) -> None:
    """Record that job `job_id` imports the upload at `key` (it no longer counts as
    unused). An upload is imported once: Conflict if another job already took it (its
    presigned form stays valid until it expires, so the object may have been sent again)."""
    if Upload.update(job=job_id).where((Upload.object_key == key) & Upload.job.is_null()).execute():
        return
    upload = Upload.get_or_none(Upload.object_key == key)
    taken_by = upload.job_id if upload is not None else None
    raise Conflict(
        f"the upload at {key} was already imported by job {taken_by}; each upload is imported once: "
        "create a new upload for another import"
    )
