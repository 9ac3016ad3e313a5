"""The Falcon app in-process, over the real control database and S3, for API tests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from falcon import testing

from app.api import Services, create_app
from pipeline.config import Settings
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads
from stages.storage import ObjectStore


def api_client(
    settings: Settings,
    store: ObjectStore | None = None,
    *,
    uploads: Uploads | None = None,
    wake: Callable[..., None] = lambda *args, **kwargs: None,
    readiness: dict[str, Callable[[], Any]] | None = None,
) -> testing.TestClient:
    """A test client of the app built from `settings`; uploads default to a 1 h expiry on `store`."""
    assert uploads is not None or store is not None
    services = Services(
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=wake,
        uploads=uploads or Uploads(store, expiry=dt.timedelta(hours=1)),
        readiness=readiness or {},
    )
    return testing.TestClient(create_app(services))
