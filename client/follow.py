"""Following a job until it ends, by polling `GET /v1/jobs/{id}`.

The job runs on the server whatever happens here: losing the API for a while (a
deploy, a network blip) is waited out for `patience` seconds before giving up, and
giving up or Ctrl-C stops only the watching.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from client.api import Api
from client.errors import ApiUnreachable
from client.views import JobView

TERMINAL = frozenset({"completed", "failed", "cancelled"})
POLL_SECONDS = 2.0  # 30 requests a minute, well inside the API's default 120
PATIENCE_SECONDS = 300.0


def follow(
    api: Api,
    job_id: str,
    view: JobView,
    *,
    interval: float = POLL_SECONDS,
    patience: float = PATIENCE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    notify: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """The job once it is completed, failed or cancelled; `view` sees every poll.
    ApiUnreachable when the API stayed out of reach for `patience` seconds."""
    lost_since: float | None = None
    while True:
        try:
            job = api.job(job_id)
        except ApiUnreachable as err:
            now = clock()
            if lost_since is None:
                lost_since = now
                notify(f"{err.message}; the import goes on on the server, still watching")
            if now - lost_since >= patience:
                raise ApiUnreachable(
                    f"{err.message} for {patience:g} s; the import goes on on the server: "
                    f"follow it with `capydb-import status {job_id} --wait`"
                ) from None
            sleep(interval)
            continue
        lost_since = None
        view.update(job)
        if job.get("state") in TERMINAL:
            return job
        sleep(interval)
