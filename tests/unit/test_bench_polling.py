"""The bench polls a job often while it is young, then less: a poll never adds more than
1 % (or 0.1 s) to the time it measures, and never comes more than once a second later."""

import pytest

from bench.service import POLL_MAX_SECONDS, POLL_SECONDS, poll_interval


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
