"""Heartbeats: a claimed stage proves it is alive, so a stale claim can be taken over."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from types import TracebackType

from pipeline import jobs
from pipeline.db import database

log = logging.getLogger(__name__)


class Heartbeat:
    """Extends a job's claim every `interval` seconds in a background thread, until
    the stage ends or the claim is found taken over (then the stage's own guarded
    commit will find it is no longer the holder and change nothing)."""

    def __init__(self, job_id: str, actor: str, interval: float, *, until: dt.datetime | None = None) -> None:
        self.job_id = job_id
        self.actor = actor
        self.interval = interval
        # Past the job's time limit a stage stuck where no deadline reaches it must not
        # keep its claim fresh: the claim goes stale and the next claim fails the job.
        self.until = until
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if self.until is not None and jobs.utcnow() >= self.until:
                log.warning(
                    "job %s: past its time limit; %s stops extending its claim", self.job_id, self.actor
                )
                return
            try:
                if not jobs.heartbeat(self.job_id, self.actor):
                    log.warning("job %s: claim lost by %s", self.job_id, self.actor)
                    return
            except Exception:  # the control database may blip; the next beat retries
                log.exception("job %s: heartbeat failed", self.job_id)
            finally:
                if not database.is_closed():  # the connection is this thread's own
                    database.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
