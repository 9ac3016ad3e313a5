"""A job's time limit, counted from when it started (no database: Job rows in memory)."""

import datetime as dt

from pipeline.config import Settings
from pipeline.limits import command_limit, job_deadline, job_over_time, preflight_command_limit
from pipeline.models import Job

START = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
SETTINGS = Settings.from_env({}).replace(
    job_time_limit_seconds=3600,
    command_timeout_seconds=600,
)


def at(minutes: float):
    return lambda: START + dt.timedelta(minutes=minutes)


def test_the_job_deadline_is_what_is_left_of_its_limit():
    job = Job(started_at=START)
    deadline = job_deadline(job, SETTINGS, now=at(45))
    assert 899 < deadline.remaining() <= 900
    assert deadline.limit.describe() == "the import's time limit of 3600 s (CAPY_JOB_TIME_LIMIT_SECONDS)"
    # Before its first claim a job has used none of its time.
    assert 3599 < job_deadline(Job(started_at=None), SETTINGS).remaining() <= 3600


def test_a_job_past_its_limit_is_named_with_the_setting():
    job = Job(started_at=START)
    assert job_over_time(job, SETTINGS, "restore", now=at(59)) is None
    message = job_over_time(job, SETTINGS, "restore", now=at(61))
    assert message.startswith(
        "the import ran longer than its time limit of 3600 s (CAPY_JOB_TIME_LIMIT_SECONDS) before its restore stage; "
    )


def test_command_limits_name_their_settings():
    assert command_limit(SETTINGS).describe() == "600 s (CAPY_COMMAND_TIMEOUT_SECONDS)"
    assert preflight_command_limit(SETTINGS).describe() == "15 s (CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS)"
