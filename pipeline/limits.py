"""The time limits of an import, built from settings: what each external command may
take, what preflight's short commands may take, and what a whole job may take.

Each `Limit` names its setting and says what to do when it is reached, so the error a
user sees (and the operator reads) points at the fix.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from pipeline.config import Settings
from pipeline.models import Job, utcnow
from stages.tools.commands import DEFAULT_LIMIT
from stages.tools.timelimit import Deadline, Limit

JOB_LIMIT_ADVICE = (
    "split the import into smaller dumps (by schema or by table), or ask the operator to raise "
    "CAPY_JOB_TIME_LIMIT_SECONDS"
)


def command_limit(settings: Settings) -> Limit:
    return Limit(settings.command_timeout_seconds, DEFAULT_LIMIT.setting, DEFAULT_LIMIT.advice)


def preflight_command_limit(settings: Settings) -> Limit:
    return Limit(
        settings.preflight_command_timeout_seconds,
        "CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS",
        "check that the upload is an undamaged pg_dump output; if it is, try again later or ask "
        "the operator to raise CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS",
    )


def job_limit(settings: Settings) -> Limit:
    return Limit(
        settings.job_time_limit_seconds,
        "CAPY_JOB_TIME_LIMIT_SECONDS",
        JOB_LIMIT_ADVICE,
        label="the import's time limit of ",
    )


def job_elapsed(job: Job, *, now: Callable[[], dt.datetime] = utcnow) -> float:
    """Seconds since the job first started (0 before its first claim)."""
    return 0.0 if job.started_at is None else (now() - job.started_at).total_seconds()


def job_deadline(job: Job, settings: Settings, *, now: Callable[[], dt.datetime] = utcnow) -> Deadline:
    """The job's time limit, counted from `started_at`, as a deadline for its commands."""
    limit = job_limit(settings)
    return Deadline.within(limit.seconds - job_elapsed(job, now=now), limit)


def job_over_time(
    job: Job, settings: Settings, stage: str, *, now: Callable[[], dt.datetime] = utcnow
) -> str | None:
    """The error for a job that used up its time before `stage`, else None."""
    if job_elapsed(job, now=now) < settings.job_time_limit_seconds:
        return None
    limit = job_limit(settings)
    return (
        f"the import ran longer than its time limit of {limit.describe().removeprefix(limit.label)} "
        f"before its {stage} stage; {limit.advice}"
    )
