"""Runs one stage of one job: claim, work under a heartbeat, commit, wake the next.

The next stage is enqueued only after this stage's result is committed. Failures are
classified: a PermanentError fails the job at once (its message becomes `error`); a
TransientError releases the claim and is re-raised for Dramatiq to retry with backoff,
until the claim that failed was the job's last attempt (`max_attempts`): then the job
fails saying it gave up, with the real last error, as `transient`, or as `permanent`
when the error says what failing every time means (a source that kept refusing
connections: `TransientError.when_repeated`).

Every write of the stage is guarded by its claim: a worker whose claim was taken over
(its heartbeat went stale, another worker claimed the stage) learns it from the
heartbeat or from its next write (`ClaimLost`), stops its commands, and leaves the job
and its preview to the new holder: it neither fails nor cleans up anything.

A claim refused because the job's organization is at its limit (fair share) is woken
again later; a restore that waited its window for a slot on its cluster
(pipeline.restore_slots) is handed back, its attempt not counted, and woken at once; a
job past its time limit fails at the start of its next stage. A cancel requested
while a stage runs reaches it through the heartbeat thread, which stops the
stage's commands; the job then ends `cancelled` (pipeline.cancellation).

A message that finds the stage held by another worker whose lease is still fresh is
sent again for when that lease can have expired: the holder may have died (RabbitMQ
redelivers its message at once), and then only a later look can take the job over.
A stage interrupted by a worker's shutdown hands its claim back and wakes itself, so
another worker takes it at once instead of after the lease.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Protocol

from dramatiq.middleware.shutdown import Shutdown
from dramatiq.middleware.time_limit import TimeLimitExceeded

from pipeline import cancellation, jobs, logs, metrics
from pipeline.config import Settings
from pipeline.db import CONNECTION_ERRORS, ControlDatabaseUnavailable, database
from pipeline.import_steps import ImportSteps, StageContext
from pipeline.lease import Heartbeat
from pipeline.limits import job_over_time
from pipeline.models import ACTIVE_STATES, Job, Stage
from pipeline.restore_slots import StillWaiting
from stages.errors import Cancelled, PermanentError, TransientError

log = logging.getLogger(__name__)

# What a transient error promised ("…; it will be retried"), untrue once retries ran out.
_RETRY_PROMISE = re.compile(r";\s*(it|the \w+) will (be retried|try again)\s*$")

# A message that finds a fresh foreign lease comes back this long after it can expire.
RECHECK_MARGIN = dt.timedelta(seconds=5)


class Wake(Protocol):
    """Enqueue `stage` of a job, after `delay_ms` (StageQueue.wake)."""

    def __call__(self, job_id: str, stage: str, delay_ms: int = 0) -> None: ...


class Runner:
    def __init__(
        self,
        settings: Settings,
        steps: ImportSteps,
        wake: Wake,
        *,
        lease: dt.timedelta | None = None,
        heartbeat_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.steps = steps
        self.wake = wake
        self.lease = lease or dt.timedelta(seconds=settings.lease_seconds)
        # Several beats per lease: one lost to a database blip does not lose the claim.
        self.heartbeat_seconds = heartbeat_seconds or self.lease.total_seconds() / 6

    def run(self, job_id: str, stage: str) -> None:
        """Run `stage` of the job if it is ours to run. Raises TransientError for
        Dramatiq to retry the message; ControlDatabaseUnavailable when what failed was
        the control database itself (claiming, committing, releasing): then nothing of
        the attempt could be recorded, and the message is retried until it is back."""
        try:
            with logs.bound(job_id=job_id, stage=stage, attempt=None):
                self._run(job_id, stage)
        except CONNECTION_ERRORS as err:
            database.close()  # the next statement reconnects
            log.warning("job %s: %s could not reach the control database: %s", job_id, stage, err)
            raise ControlDatabaseUnavailable(
                f"the service's control database was unavailable during the {stage} stage; it will be retried"
            ) from None

    def _run(self, job_id: str, stage: str) -> None:
        actor = jobs.worker_id()
        try:
            job = jobs.claim(
                job_id, stage, actor, lease=self.lease, org_limit=self.settings.org_max_active_jobs
            )
        except jobs.OrganizationAtLimit as busy:
            # Fair share: look again later. The message is acknowledged, so neither a
            # Dramatiq retry nor one of the job's attempts is used.
            log.info("job %s: %s waits: %s", job_id, stage, busy.message)
            self.wake(job_id, stage, delay_ms=self.settings.org_wait_retry_seconds * 1000)
            return
        if job is None:
            self._not_claimed(job_id, stage, actor)
            return
        if job.cancel_requested_at is not None:  # asked while the stage was between workers
            self._cancelled(job, actor)
            return
        over = job_over_time(job, self.settings, stage)
        if over is not None:
            self._fail(job, actor, over, "permanent")
            return
        logs.bind(attempt=job.attempts)
        log.info("job %s: %s started by %s (attempt %d)", job_id, stage, actor, job.attempts)
        timed = metrics.StageRun(stage)
        context = StageContext(job, actor)
        beat = Heartbeat(
            job_id,
            actor,
            self.heartbeat_seconds,
            until=self._claim_until(job),
            on_cancel=context.cancellation.cancel,
            on_lost=context.lose_claim,
        )
        try:
            if job.attempts > 1 or job.facts.tool_process or job.displaced_claim:
                # An earlier claim ended, perhaps with its worker, or went stale and was
                # taken over (after a replay or a retry attempts start again at 1): its
                # tools and sessions must be gone before the stage runs again. (A stage
                # that ended well leaves no tool recorded: jobs.advance.)
                self.steps.take_over(job)
            with beat:
                result = self.steps.run(stage, context)
            context.check_claim()
            timed.end(metrics.SUCCEEDED)
        except jobs.ClaimLost as lost:
            timed.end("claim_lost")
            log.warning("job %s: %s stopped: %s", job_id, stage, lost.message)
            return
        except Cancelled:
            timed.end("cancelled")
            self._cancelled(job, actor)
            return
        except StillWaiting as waiting:
            timed.end("handed_back")
            # Every restore slot of the cluster stayed taken for as long as the stage may
            # wait in one worker: back to the queue, the attempt not counted, at once.
            log.info("job %s: %s handed back: %s", job_id, stage, waiting.message)
            if jobs.hand_back(job_id, actor, f"{stage} handed back to the queue: {waiting.message}"):
                self.wake(job_id, stage)
            return
        except PermanentError as err:
            timed.end("permanent")
            self._fail(job, actor, err.message, "permanent")
            return
        except Shutdown:
            # The worker is stopping (SIGTERM; its tools were stopped as this unwound):
            # hand the stage back now rather than leave it to the lease.
            timed.end("interrupted")
            log.warning("job %s: %s interrupted by the worker's shutdown; handing it back", job_id, stage)
            self._release(
                job_id,
                actor,
                f"the worker running the {stage} stage shut down; it will be resumed",
                refund_attempt=True,
            )
            try:
                self.wake(job_id, stage)
            except TransientError as err:  # the broker is going too: sweep's reaper wakes it
                log.warning("job %s: could not re-queue %s: %s", job_id, stage, err.message)
            return
        except TimeLimitExceeded:
            timed.end("time_limit")
            self._fail(
                job,
                actor,
                f"the {stage} stage ran longer than its time limit of {self.settings.stage_time_limit_seconds} s "
                "(CAPY_STAGE_TIME_LIMIT_SECONDS); split the import into smaller dumps, or ask the operator "
                "to raise CAPY_STAGE_TIME_LIMIT_SECONDS together with the broker's consumer timeout",
                "permanent",
            )
            return
        except TransientError as err:
            timed.end("transient")
            log.warning("job %s: %s failed transiently: %s", job_id, stage, err.message)
            if job.attempts >= job.max_attempts:
                self._give_up(job, actor, stage, err.message, err.when_repeated)
                return
            self._release(job_id, actor, err.message)
            raise
        except CONNECTION_ERRORS as err:
            # Ours, not the user's, and the message names no server. The attempt counts
            # (an error that repeats, a statement timeout, must end by max_attempts).
            # When the release cannot be written either, run() says the control
            # database is unavailable and the claim goes stale for a later message.
            timed.end("control_database")
            log.warning("job %s: %s lost the control database: %s", job_id, stage, err)
            database.close()  # the next statement reconnects
            unavailable = (
                f"the service's control database was unavailable during the {stage} stage; it will be retried"
            )
            if job.attempts >= job.max_attempts:
                self._give_up(job, actor, stage, unavailable, None)
                return
            self._release(job_id, actor, unavailable)
            raise ControlDatabaseUnavailable(unavailable) from None
        except Exception:
            timed.end("internal")
            log.exception("job %s: %s failed unexpectedly", job_id, stage)
            internal = f"an internal error interrupted the {stage} stage; it will be retried"
            if job.attempts >= job.max_attempts:
                self._give_up(job, actor, stage, internal, None)
                return
            self._release(job_id, actor, internal)
            raise TransientError(f"internal error in {stage}") from None
        following = jobs.next_stage(stage)
        if following is not None and context.cancel_request() is not None:
            self._cancelled(job, actor)
            return
        if following is None:
            completed = jobs.complete(job_id, actor, stage, facts=result, progress={"phase": "completed"})
            if completed is None:
                log.warning(
                    "job %s: %s finished, but %s no longer holds the job; nothing to do", job_id, stage, actor
                )
                return
            if context.cancel_request() is not None:
                cancellation.note_completed_anyway(job_id, actor)
            metrics.import_completed(completed.upload_key, completed.facts)
            self.steps.cleanup(completed, succeeded=True)
            log.info("job %s: completed", job_id)
            return
        if jobs.advance(job_id, actor, stage, facts=result):
            self.wake(job_id, following)

    def _claim_until(self, job: Job) -> dt.datetime | None:
        """When heartbeats stop: the job's time limit, and a lease more for the stage
        to fail the job itself (its commands are stopped at the limit)."""
        if job.started_at is None:
            return None
        return job.started_at + dt.timedelta(seconds=self.settings.job_time_limit_seconds) + self.lease

    def _release(self, job_id: str, actor: str, error: str, *, refund_attempt: bool = False) -> None:
        """Give the claim back for a retry; nothing of this attempt may keep running on
        the cluster meanwhile (a stopped restore's statement may still be executing)."""
        released = jobs.release(job_id, actor, error, refund_attempt=refund_attempt)
        if released is not None:  # else another worker holds it now: its sessions are its own
            self.steps.stop_sessions(released)

    def _cancelled(self, job: Job, actor: str) -> None:
        """End a job whose cancel was requested, then drop what it made."""
        cancelled = cancellation.finish(job.id, actor)
        if cancelled is None:  # another worker holds it now, or it already ended
            log.info("job %s: cancelled, but no longer held by %s; nothing to do", job.id, actor)
            return
        log.warning("job %s: %s", job.id, cancelled.error)
        self.steps.cleanup(cancelled, succeeded=False)

    def _fail(self, job: Job, actor: str, error: str, classification: str) -> None:
        """Fail the job this claim holds, then drop what it made. A claim that was taken
        over fails nothing and drops nothing: the preview is the new holder's."""
        failed = jobs.fail(job.id, actor, error, classification=classification, holder=actor)
        if failed is None:
            log.warning(
                "job %s: not failed (%s: %s): %s no longer holds it", job.id, classification, error, actor
            )
            return
        metrics.job_failed(failed.stage, classification)
        log.warning("job %s: failed (%s): %s", job.id, classification, error)
        self.steps.cleanup(failed, succeeded=False)

    def _give_up(self, job: Job, actor: str, stage: str, last: str, when_repeated: str | None) -> None:
        """The job's last attempt failed transiently: fail it, saying so."""
        error, classification = gave_up(stage, job.attempts, last, when_repeated)
        self._fail(job, actor, error, classification)

    def _not_claimed(self, job_id: str, stage: str, actor: str) -> None:
        """A message we cannot act on: a duplicate, a stale wake-up, or retries spent."""
        job = Job.get_or_none(Job.id == job_id)
        if job is None or job.state not in ACTIVE_STATES:
            log.info("job %s: %s message ignored, job is %s", job_id, stage, job and job.state)
            return
        if (
            job.stage == stage
            and job.attempts >= job.max_attempts
            and (
                job.claimed_by is None
                or job.heartbeat_at is None
                or job.heartbeat_at < jobs.utcnow() - self.lease
            )
        ):
            self.exhausted(job_id, stage)
            return
        if job.stage != stage and job.claimed_by is None and job.stage == jobs.next_stage(stage):
            # The previous run committed this stage but its wake-up was lost.
            log.info("job %s: re-waking %s", job_id, job.stage)
            self.wake(job_id, job.stage)
            return
        if job.stage == stage and job.claimed_by is not None and job.heartbeat_at is not None:
            # A foreign lease: its holder may be alive (a duplicate message) or dead
            # (RabbitMQ redelivered its message at once). Look again once the lease can
            # have expired; the claim is then taken over, or this repeats while the
            # holder lives. The new message uses none of the job's attempts.
            remaining = job.heartbeat_at + self.lease - jobs.utcnow()
            delay = max(remaining, dt.timedelta(0)) + RECHECK_MARGIN
            log.info(
                "job %s: %s is held by %s; looking again in %d s",
                job_id,
                stage,
                job.claimed_by,
                delay.total_seconds(),
            )
            self.wake(job_id, stage, delay_ms=int(delay.total_seconds() * 1000))
            return
        log.info("job %s: %s is held by %s; nothing to do", job_id, job.stage, job.claimed_by)

    def exhausted(self, job_id: str, stage: str) -> None:
        """The message's retries ran out: fail the job with the last error it recorded,
        unless the job still has attempts left (its attempts failed without claiming,
        e.g. while the control database was away): then wake the stage again."""
        job = Job.get_or_none(Job.id == job_id)
        if job is None or job.state not in ACTIVE_STATES:
            return
        stale = (
            job.claimed_by is None
            or job.heartbeat_at is None
            or job.heartbeat_at < jobs.utcnow() - self.lease
        )
        if job.stage == stage and job.attempts < job.max_attempts and stale:
            log.warning(
                "job %s: the %s message ran out of retries with %d of %d attempts used; waking it again",
                job_id,
                stage,
                job.attempts,
                job.max_attempts,
            )
            self.wake(job_id, stage, delay_ms=int(self.lease.total_seconds() * 1000))
            return
        if job.error:
            last = job.error
        elif job.claimed_by:
            last = (
                f"the worker running it ({job.claimed_by}) stopped heartbeating: it was killed, ran out "
                "of memory or lost its host"
            )
        else:
            last = "the last attempt ended without recording an error"
        error, classification = gave_up(stage, job.attempts, last, None)
        # Only a job nobody is running: a live claim's holder decides for itself.
        failed = jobs.fail(
            job.id, "worker", error, classification=classification, stale_before=jobs.utcnow() - self.lease
        )
        if failed is None:
            log.info("job %s: retries of %s ran out, but a worker holds it now; left to it", job_id, stage)
            return
        metrics.job_failed(failed.stage, classification)
        log.warning("job %s: failed (%s): %s", job_id, classification, error)
        self.steps.cleanup(failed, succeeded=False)


def gave_up(stage: str, attempts: int, last: str, when_repeated: str | None) -> tuple[str, str]:
    """The job's `error` and `retry_classification` once its retries ran out: the real
    last error (without its promise of a retry), or, for a failure that means something
    else when it repeats (a source that kept refusing), that meaning, as permanent."""
    if when_repeated:
        return f"gave up on the {stage} stage after {attempts} attempts: {when_repeated}", "permanent"
    last = _RETRY_PROMISE.sub("", last)
    return f"gave up on the {stage} stage after {attempts} attempts; last error: {last}", "transient"


__all__ = ["Runner", "Stage", "gave_up"]
