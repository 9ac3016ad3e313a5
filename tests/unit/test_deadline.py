"""Deadlines without sockets: the budget of each round trip, and a DNS lookup bounded by
what is left (an injected resolver that never answers; nothing is looked up)."""

import threading
import time

import pytest

from stages.connections.deadline import Deadline, SourceTimedOut
from stages.connections.pgurl import SourceURL
from stages.errors import TransientError
from stages.preflight import Target
from stages.preflight.live import bounded_resolver, check_live_source


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_total_deadline_shrinks_and_bounds_the_connect_timeout():
    clock = FakeClock()
    deadline = Deadline(total=20, what="the preflight deadline", clock=clock)
    assert deadline.remaining() == 20
    assert deadline.connect_timeout(10) == 10
    clock.now += 15
    assert deadline.remaining() == 5
    assert deadline.connect_timeout(10) == 5
    clock.now += 4.5
    assert deadline.connect_timeout(10) == 2  # libpq's smallest useful connect_timeout
    clock.now += 1
    assert deadline.remaining() < 0
    assert deadline.limit() == "20 s (the preflight deadline)"


def test_a_per_read_deadline_gives_each_round_trip_the_same_budget():
    clock = FakeClock()
    deadline = Deadline(per_read=1800, what="the source read timeout", clock=clock)
    clock.now += 10_000
    assert deadline.remaining() == 1800
    assert deadline.connect_timeout(10) == 10
    assert deadline.limit() == "1800 s (the source read timeout)"
    both = Deadline(per_read=30, total=10, clock=clock)
    assert both.remaining() == 10
    with pytest.raises(ValueError):
        Deadline()


def test_a_lookup_that_never_answers_is_cut_off_at_the_deadline():
    never = threading.Event()

    def hanging(host, port):
        never.wait(30)
        return ["8.8.8.8"]

    lookup = bounded_resolver(hanging, Deadline(total=0.5, what="the preflight deadline"))
    started = time.monotonic()
    with pytest.raises(SourceTimedOut) as info:
        lookup("db.invalid", 5432)
    never.set()
    assert time.monotonic() - started < 10
    assert isinstance(info.value, TransientError)
    assert info.value.message == (
        "the source host 'db.invalid' did not resolve within 0.5 s (the preflight deadline); "
        "check the host name, or try again if its DNS is slow"
    )


def test_a_lookup_in_time_answers_or_raises_as_the_resolver_did():
    deadline = Deadline(total=5)
    assert bounded_resolver(lambda h, p: ["8.8.8.8"], deadline)("db.invalid", 5432) == ["8.8.8.8"]

    def failing(host, port):
        raise SourceTimedOut("boom")

    with pytest.raises(SourceTimedOut, match="boom"):
        bounded_resolver(failing, deadline)("db.invalid", 5432)


def test_a_preflight_whose_dns_never_answers_fails_reachability_within_its_deadline():
    never = threading.Event()

    def hanging(host, port):
        never.wait(30)
        return ["8.8.8.8"]

    target = Target(
        major=15,
        storage_limit_bytes=1024**3,
        recreate=False,
        is_empty=lambda: True,
        version="15.4",
        available_extensions=lambda: {"plpgsql": "1.0"},
    )
    source = SourceURL.parse_source("postgres://app@db.invalid/app")
    started = time.monotonic()
    report = check_live_source(source, target, allow_private=False, deadline_seconds=0.5, resolver=hanging)
    never.set()
    assert time.monotonic() - started < 10
    checks = {check.name: check for check in report.checks}
    assert checks["source_address_allowed"].detail == (
        "not checked: the source host does not resolve (see source_reachable)"
    )
    assert checks["source_reachable"].status == "fail" and checks["source_reachable"].transient
    assert "did not resolve within 0.5 s (the preflight deadline)" in checks["source_reachable"].detail
