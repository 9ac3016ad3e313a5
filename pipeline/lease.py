"""Heartbeats: a claimed stage proves it is alive, so a stale claim can be taken over;
and it hears about a cancel, so the stage's tools are stopped within seconds."""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from pipeline import jobs
from pipeline.db import database

log = logging.getLogger(__name__)

# How often a running stage looks for a cancel request: one indexed read of its row.
CANCEL_POLL_SECONDS = 1.0


class Heartbeat:
    """Extends a job's claim every `interval` seconds in a background thread, until
    the stage ends or the claim is found taken over (then the stage's own guarded
    commit will find it is no longer the holder and change nothing).

    With `on_lost`, it says so when the claim is found lost (the stage then stops its
    commands and changes nothing more). With `on_cancel`, it also reads every `cancel_poll` seconds whether the job is
    being cancelled, and calls `on_cancel(reason)` once when it is (e.g. stopping the
    stage's running commands)."""

    def __init__(
        self,
        job_id: str,
        actor: str,
        interval: float,
        *,
        until: dt.datetime | None = None,
        on_cancel: Callable[[str], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        cancel_poll: float = CANCEL_POLL_SECONDS,
    ) -> None:
        self.job_id = job_id
        self.actor = actor
        self.interval = interval
        # Past the job's time limit a stage stuck where no deadline reaches it must not
        # keep its claim fresh: the claim goes stale and the next claim fails the job.
        self.until = until
        self.on_cancel = on_cancel
        # Told once when the claim is found taken over: the stage must stop its work.
        self.on_lost = on_lost
        self.cancel_poll = min(cancel_poll, interval)
        self._told = False
        self._stop = threading.Event()
        # In a copy of the caller's context: its lines carry the stage's job_id, stage, attempt.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._beat,), name=f"heartbeat-{job_id}", daemon=True
        )

    def _beat(self) -> None:
        beating = True
        next_beat = time.monotonic() + self.interval
        tick = self.cancel_poll if self.on_cancel is not None else self.interval
        try:
            while not self._stop.wait(tick):
                try:
                    self._pass_on_cancel()
                    if beating and time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + self.interval
                        beating = self._extend()
                    if not beating and (self.on_cancel is None or self._told):
                        return
                except Exception:  # the control database may blip; the next beat retries
                    log.exception("job %s: heartbeat failed", self.job_id)
                    database.close()  # reconnect at the next tick
        finally:
            if not database.is_closed():  # the connection is this thread's own
                database.close()

    def _extend(self) -> bool:
        """One heartbeat; False once the claim is past the time limit or lost."""
        if self.until is not None and jobs.utcnow() >= self.until:
            log.warning("job %s: past its time limit; %s stops extending its claim", self.job_id, self.actor)
            return False
        if not jobs.heartbeat(self.job_id, self.actor):
            log.warning("job %s: claim lost by %s", self.job_id, self.actor)
            if self.on_lost is not None:
                self.on_lost()
            return False
        return True

    def _pass_on_cancel(self) -> None:
        """Pass a cancel request on to the stage, once. Heartbeats go on while the
        stage winds down, so nobody takes the claim over meanwhile."""
        if self.on_cancel is None or self._told:
            return
        reason = jobs.cancel_reason(self.job_id)
        if reason is None:
            return
        log.warning("job %s: %s; stopping the stage", self.job_id, reason)
        self._told = True
        self.on_cancel(reason)

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
