"""Dump uploads: presigned PUT URLs under the project's own prefix, and their checks."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Callable
from typing import Any

from pipeline import audit
from pipeline.errors import NotFound
from pipeline.models import Project, utcnow
from pipeline.principals import Principal
from pipeline.serialize import timestamp
from stages.errors import ObjectMissing
from stages.storage import ObjectStore, new_object_key, validate_object_key


class Uploads:
    def __init__(
        self,
        store: ObjectStore,
        *,
        expiry: dt.timedelta,
        clock: Callable[[], dt.datetime] = utcnow,
        token: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self.store = store
        self.expiry = expiry
        self.clock = clock
        self.token = token
        self._bucket_ready = threading.Event()

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; done once per process."""
        if not self._bucket_ready.is_set():
            self.store.ensure_bucket()
            self._bucket_ready.set()

    def create(self, project: Project, principal: Principal) -> dict[str, Any]:
        """A new object key and a presigned PUT URL for it; records the audit event."""
        self.ensure_bucket()
        key = new_object_key(project.id, self.token())
        expires_at = self.clock() + self.expiry
        url = self.store.presign_put(key, self.expiry)
        # The URL is a credential: the audit event records the key, never the URL.
        audit.record(
            project,
            audit.IMPORT_UPLOAD_CREATED,
            principal.actor,
            target_id=key,
            details={"object_key": key, "expires_at": timestamp(expires_at)},
        )
        return {"object_key": key, "upload_url": url, "expires_at": timestamp(expires_at)}

    @staticmethod
    def validate_key(key: str, project: Project) -> str:
        """The key, if it is an upload key of this project (InvalidObjectKey otherwise)."""
        return validate_object_key(key, project.id)

    def require_object(self, key: str) -> int:
        """The uploaded object's size; NotFound if nothing was uploaded at `key`."""
        try:
            return self.store.size(key)
        except ObjectMissing:
            raise NotFound(
                f"nothing has been uploaded at {key}; PUT the dump to the upload_url first "
                "(the URL expires, create a new upload if it did)"
            ) from None
