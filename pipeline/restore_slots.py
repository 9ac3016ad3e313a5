"""Restore slots: at most a few imports write into one target cluster at once.

Each cluster has a limit (its own `restore_limit`, else CAPY_CLUSTER_RESTORE_LIMIT) on the
imports running their restore stage there. The restore step takes a slot before it
touches the cluster (`wait_for_restore_slot`); a job that finds every slot taken waits
in its worker, says so in its progress, stays cancellable, and starts as soon as a slot
frees and it is its turn: waiting restores take free slots in the order they began to
wait (a row with `queued_at` and no `acquired_at` is a place in the cluster's queue). It
waits at most a window (`WAIT_WINDOW_SECONDS`) in one worker, so the wait does not eat
its stage's time limit: then `StillWaiting` makes the Runner hand the stage back to the
queue with the claim's attempt not counted, and it waits on wherever it lands, with its
place (when it began to wait travels in its progress, `waiting_since`). Between the
two claims, for the moment the message takes, it holds no place.

**A slot is a claim's, not a connection's.** A row of `restore_slots` records the claim
that took it, or waits for it (the job's `claimed_by` and `claimed_at` at that moment),
and counts only while that same claim still holds the job at its restore stage with a
heartbeat younger than the lease. So a slot needs no release to end: the stage's commit (restore done),
a failure, a retry, a cancel or a takeover all change the claim, and a worker that was
SIGKILLed stops heartbeating: its slot is free one lease later, exactly when its claim
can be taken over. `restore_slot` (a context manager) also releases at once, for callers
that finish with the cluster before their stage ends. A holder whose heartbeat went
stale but who was not taken over and comes back counts again: as with claims, a worker
silent for longer than the lease is presumed dead.

**Race-free acquisition.** Taking a slot is one transaction in the control database
that first locks the cluster's row (`SELECT … FOR NO KEY UPDATE`), then counts the live
slots and the places ahead in the queue, and writes its own row: acquirers of one cluster take turns, acquirers of different
clusters do not wait for each other, and the lock ends with the transaction, so it can
never be left behind. (`FOR NO KEY UPDATE` rather than `FOR UPDATE`: it does not block the
foreign-key checks of jobs and projects being created on the cluster meanwhile.) A
session-level advisory lock per slot was the alternative, and was rejected: it belongs
to a database connection, not to the claim, so a dropped or recycled control-database
connection would free it while the restore goes on, and it leaves no row to count for
the waiting job's progress or an operator's listing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from peewee import fn

from pipeline import jobs
from pipeline.config import Settings
from pipeline.db import database
from pipeline.errors import InvalidRequest, NotFound
from pipeline.models import Cluster, Job, JobEvent, RestoreSlot, Stage, State, utcnow
from pipeline.serialize import timestamp
from stages.errors import CapyError

log = logging.getLogger(__name__)

WAITING = "waiting for a restore slot on the target cluster"
# The longest a restore waits for a slot in one worker before it is handed back to the
# queue (capped at a tenth of CAPY_STAGE_TIME_LIMIT_SECONDS, which the wait counts in).
WAIT_WINDOW_SECONDS = 120.0
# How often a waiting restore looks for a free slot (and whether it was cancelled).
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class SlotUse:
    """Restore slots of a cluster: how many are in use (counting the caller's, once it
    has one) of how many it has, and how many restores that queued before the caller
    still wait for one (they go first)."""

    cluster_id: str
    in_use: int
    limit: int
    ahead: int = 0


class StillWaiting(CapyError):
    """The restore waited for a slot as long as it may in one worker; the Runner hands
    the stage back to the queue (the claim's attempt is not counted) and it waits on."""


class SlotContext(Protocol):
    """What waiting needs of the stage (pipeline.import_steps.StageContext)."""

    job: Job
    actor: str

    def check_cancelled(self, *, ask: bool = True) -> None: ...

    def progress(self, progress: dict[str, Any]) -> None: ...


def limit_of(cluster: Cluster, default: int) -> int:
    """The cluster's restore limit: its own, else the deployment's default."""
    return cluster.restore_limit if cluster.restore_limit is not None else default


def _live(cluster_id: str, fresh_since: dt.datetime) -> Any:
    """The cluster's rows (slots held, places in the queue) whose claim still holds its
    job's restore stage, heartbeating."""
    return (
        RestoreSlot.select(RestoreSlot.job)
        .join(Job, on=(Job.id == RestoreSlot.job))
        .where(
            (RestoreSlot.cluster == cluster_id)
            & (Job.state == State.RUNNING.value)
            & (Job.stage == Stage.RESTORE.value)
            & (Job.claimed_by == RestoreSlot.claimed_by)
            & (Job.claimed_at == RestoreSlot.claimed_at)
            & (Job.heartbeat_at >= fresh_since)
        )
    )


def _ended(cluster_id: str) -> Any:
    """The cluster's rows whose claim is gone for good (not merely stale)."""
    still_held = Job.select(Job.id).where(
        (Job.id == RestoreSlot.job)
        & (Job.state == State.RUNNING.value)
        & (Job.stage == Stage.RESTORE.value)
        & (Job.claimed_by == RestoreSlot.claimed_by)
        & (Job.claimed_at == RestoreSlot.claimed_at)
    )
    return (RestoreSlot.cluster == cluster_id) & ~fn.EXISTS(still_held)


def in_use(
    cluster: Cluster, *, default_limit: int, lease: dt.timedelta, now: dt.datetime | None = None
) -> SlotUse:
    """The cluster's restore slots in use now, and (`ahead`) how many restores wait for one."""
    live = _live(cluster.id, (now or utcnow()) - lease)
    return SlotUse(
        cluster.id,
        live.where(RestoreSlot.acquired_at.is_null(False)).count(),
        limit_of(cluster, default_limit),
        live.where(RestoreSlot.acquired_at.is_null()).count(),
    )


def try_acquire(
    job_id: str,
    actor: str,
    *,
    default_limit: int,
    lease: dt.timedelta,
    queued_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> tuple[bool, SlotUse]:
    """Take a restore slot of the job's cluster for `actor`'s claim of its restore stage
    if one is free and no restore that queued earlier still waits for it: (True, use
    counting it). Otherwise the claim keeps (or takes) its place in the cluster's queue,
    from `queued_at` (default: now) the first time: (False, use). Taking it again under
    the same claim is harmless. Raises ClaimLost when `actor` no longer holds the job's
    restore stage."""
    at = now or utcnow()
    with database.atomic():
        job = (
            Job.select(Job.id, Job.cluster)
            .where((Job.id == job_id) & jobs.held_by(actor) & (Job.stage == Stage.RESTORE.value))
            .first()
        )
        if job is None:
            raise jobs.ClaimLost(f"{actor} no longer holds the restore stage of job {job_id}")
        # Acquirers of this cluster take turns until the commit (see the module's docstring).
        # (peewee's for_update takes the lock clause; types-peewee only knows a bool.)
        cluster = Cluster.select().where(Cluster.id == job.cluster_id).for_update("FOR NO KEY UPDATE").get()  # type: ignore[arg-type]
        limit = limit_of(cluster, default_limit)
        # (Some builds of types-peewee 4.5.1.20260909 type Model.delete as a Self-generic
        # class-only descriptor, which mypy calls ambiguous; others fixed it: unused-ignore.)
        RestoreSlot.delete().where(_ended(cluster.id)).execute()  # type: ignore[misc, unused-ignore]
        # What is left of this job is this claim's (the claim was checked above).
        mine = RestoreSlot.get_or_none(RestoreSlot.job == job_id)
        live = _live(cluster.id, at - lease)
        held = live.where(RestoreSlot.acquired_at.is_null(False)).count()
        if mine is not None and mine.acquired_at is not None:
            return True, SlotUse(cluster.id, held, limit)
        queued = mine.queued_at if mine is not None else (queued_at or at)
        ahead = live.where(
            RestoreSlot.acquired_at.is_null()
            & (RestoreSlot.job != job_id)
            & (
                (RestoreSlot.queued_at < queued)
                | ((RestoreSlot.queued_at == queued) & (RestoreSlot.job < job_id))
            )
        ).count()
        if held + ahead >= limit:
            if mine is None:
                _record(job_id, actor, queued=queued, acquired=None)
            return False, SlotUse(cluster.id, held, limit, ahead)
        _record(job_id, actor, queued=queued, acquired=at)
        use = SlotUse(cluster.id, held + 1, limit)
        _note(job_id, actor, f"restore slot taken on cluster {cluster.id} ({use.in_use} of {limit} in use)")
        return True, use


def _record(job_id: str, actor: str, *, queued: dt.datetime, acquired: dt.datetime | None) -> None:
    """Write the claim's row: its place in the queue, or (`acquired`) its slot. The claim
    is copied from the job row in the statement: the row is exactly this claim's."""
    database.execute_sql(
        "INSERT INTO restore_slots (job_id, cluster_id, claimed_by, claimed_at, queued_at, acquired_at) "
        "SELECT id, cluster_id, claimed_by, claimed_at, %s, %s FROM jobs WHERE id = %s AND claimed_by = %s "
        "ON CONFLICT (job_id) DO UPDATE SET claimed_by = EXCLUDED.claimed_by, claimed_at = EXCLUDED.claimed_at, "
        "queued_at = EXCLUDED.queued_at, acquired_at = EXCLUDED.acquired_at",
        (queued, acquired, job_id, actor),
    )


def release(job_id: str, actor: str) -> bool:
    """Give back the slot (or place in the queue) `actor`'s claim holds, at once; False
    if it held none."""
    with database.atomic():
        gone = (
            RestoreSlot.delete()  # type: ignore[misc, unused-ignore]  # (types-peewee's Model.delete, as above)
            .where((RestoreSlot.job == job_id) & (RestoreSlot.claimed_by == actor))
            .execute()
        )
        if gone:
            _note(job_id, actor, "restore slot released")
    return bool(gone)


def _note(job_id: str, actor: str, reason: str) -> None:
    """A job event that changes neither state nor stage (the history says when it waited)."""
    job = Job.select(Job.state, Job.stage).where(Job.id == job_id).first()
    if job is None:
        return
    JobEvent.create(
        job=job_id,
        actor=actor,
        reason=reason,
        from_state=job.state,
        to_state=job.state,
        from_stage=job.stage,
        to_stage=job.stage,
    )


def _counts(use: SlotUse) -> str:
    """ "4 of 4 in use", and how many restores queued before this one still wait."""
    return f"{use.in_use} of {use.limit} in use" + (f", {use.ahead} queued ahead" if use.ahead else "")


def waiting_progress(use: SlotUse, since: dt.datetime) -> dict[str, Any]:
    """What a job waiting for a slot since `since` shows in its progress."""
    restoring = "1 import is" if use.in_use == 1 else f"{use.in_use} imports are"
    ahead = ""
    if use.ahead:
        ahead = (
            "; 1 restore that queued before it goes"
            if use.ahead == 1
            else f"; {use.ahead} restores that queued before it go"
        )
        ahead += " first"
    return {
        "phase": f"{WAITING} ({_counts(use)})",
        "restore_slots_in_use": use.in_use,
        "restore_slot_limit": use.limit,
        "restore_slot_queued_ahead": use.ahead,
        "waiting_since": timestamp(since),
        "detail": (
            f"{restoring} restoring into this project's cluster, which takes at most {use.limit} at once"
            f"{ahead}; this one starts as soon as a slot is its turn (waiting uses none of its attempts)"
        ),
    }


def _waiting_since(job: Job) -> dt.datetime | None:
    """When the job began to wait, if an earlier claim of its restore stage was waiting
    when it was handed back (its progress says so): it keeps its place in the queue."""
    progress = job.progress or {}
    if not str(progress.get("phase", "")).startswith(WAITING) or not progress.get("waiting_since"):
        return None
    try:
        return dt.datetime.fromisoformat(progress["waiting_since"])
    except (TypeError, ValueError):
        return None


def window_for(settings: Settings) -> float:
    """How long a restore waits for a slot in one worker before it is handed back."""
    return min(WAIT_WINDOW_SECONDS, settings.stage_time_limit_seconds / 10)


def wait_for_restore_slot(
    context: SlotContext,
    settings: Settings,
    *,
    window: float | None = None,
    poll: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> SlotUse:
    """Hold a restore slot of the job's cluster for the rest of this claim of its restore
    stage, waiting for one if none is free (the job's progress says so). Raises Cancelled
    when the job is cancelled meanwhile, ClaimLost when the claim is lost, StillWaiting
    after `window` seconds (default: `window_for(settings)`) without a slot."""
    job = context.job
    lease = dt.timedelta(seconds=settings.lease_seconds)
    until = monotonic() + (window_for(settings) if window is None else window)
    since = _waiting_since(job) or utcnow()
    shown: SlotUse | None = None
    while True:
        context.check_cancelled()
        acquired, use = try_acquire(
            job.id, context.actor, default_limit=settings.cluster_restore_limit, lease=lease, queued_at=since
        )
        if acquired:
            if shown is not None:
                log.info("job %s: took a restore slot on cluster %s after waiting", job.id, use.cluster_id)
            return use
        if shown is None:
            log.info(
                "job %s: waits for a restore slot on cluster %s (%s)", job.id, use.cluster_id, _counts(use)
            )
            _note(job.id, context.actor, f"{WAITING} {use.cluster_id} ({_counts(use)})")
        if use != shown:
            context.progress(waiting_progress(use, since))
            shown = use
        if monotonic() >= until:
            raise StillWaiting(
                f"the restore waited for a slot on cluster {use.cluster_id} ({_counts(use)}) "
                "for as long as it may in one worker; it keeps its place in the queue"
            )
        sleep(poll)


@contextlib.contextmanager
def restore_slot(context: SlotContext, settings: Settings, **wait: Any) -> Iterator[SlotUse]:
    """Hold a restore slot while the block runs (`wait_for_restore_slot`), then give it
    back at once, whatever the block raised."""
    use = wait_for_restore_slot(context, settings, **wait)
    try:
        yield use
    finally:
        try:
            release(context.job.id, context.actor)
        except Exception:  # the slot still ends with the claim (see the module's docstring)
            log.exception("job %s: could not release its restore slot now", context.job.id)
            database.close()


def set_cluster_limit(cluster_id: str, limit: int | None) -> Cluster:
    """Give the cluster a restore limit of its own, or (None) let it follow the default."""
    if limit is not None and limit < 1:
        raise InvalidRequest(f"a cluster's restore limit must be at least 1, not {limit}")
    cluster = Cluster.get_or_none(Cluster.id == cluster_id)
    if cluster is None:
        raise NotFound(f"cluster {cluster_id} does not exist")
    Cluster.update(restore_limit=limit).where(Cluster.id == cluster_id).execute()
    return Cluster.get_by_id(cluster_id)


__all__ = [
    "SlotUse",
    "StillWaiting",
    "in_use",
    "limit_of",
    "release",
    "restore_slot",
    "set_cluster_limit",
    "try_acquire",
    "wait_for_restore_slot",
]
