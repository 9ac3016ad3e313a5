"""The bench times the service from the POST to the job's `completed_at`, and polls a job
often while it is young, then less: the poll's lag is kept apart, never counted."""

import datetime as dt

import pytest

from bench.service import POLL_MAX_SECONDS, POLL_SECONDS, completion_seconds, poll_interval

SENT = dt.datetime(2026, 12, 2, 9, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [
        (0.0, POLL_SECONDS),
        (5.0, POLL_SECONDS),
        (30.0, 0.3),
        (100.0, POLL_MAX_SECONDS),
        (3600.0, POLL_MAX_SECONDS),
    ],
)
def test_the_interval_grows_with_the_time_elapsed_within_its_bounds(elapsed: float, interval: float) -> None:
    assert poll_interval(elapsed) == pytest.approx(interval)


def test_the_wait_a_poll_adds_is_at_most_a_hundredth_of_the_time_or_the_first_interval() -> None:
    for elapsed in (0.5, 12.0, 47.0, 99.0, 250.0):
        assert poll_interval(elapsed) <= max(POLL_SECONDS, elapsed / 100) + 1e-9


def test_the_time_ends_at_the_jobs_completion_not_at_the_poll_that_saw_it() -> None:
    job = {"completed_at": "2026-12-02T09:00:00.812345Z"}
    seconds, timed_by = completion_seconds(job, SENT, polled=1.04)
    assert seconds == pytest.approx(0.812345) and timed_by == "completed_at"


@pytest.mark.parametrize(
    "completed_at",
    [
        None,  # not recorded
        "not a time",
        "2026-12-02T09:00:00.5",  # no zone: not comparable with the POST's instant
        "2026-12-02T08:59:59Z",  # before the POST: a clock stepped back
        "2026-12-02T09:00:03Z",  # after the poll that saw it: a clock stepped forward
    ],
)
def test_a_completion_time_that_cannot_be_trusted_gives_the_polls_time(completed_at: str | None) -> None:
    assert completion_seconds({"completed_at": completed_at}, SENT, polled=1.5) == (1.5, "poll")
