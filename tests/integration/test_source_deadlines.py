"""A source that accepts the login and then never answers must not hold anyone.

The source is `MuteAfterLogin` on 127.0.0.1: the login goes through to the local
PostgreSQL, every query after it is swallowed. TCP keeps acknowledging, so only the
application deadline (stages.connections.deadline) ends the wait. Deadlines are a few seconds;
bounds are generous ("returned, well before deadline + 10 s"), never exact timings.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest

from stages.connections.connect import connect
from stages.connections.deadline import Deadline, SourceTimedOut
from stages.connections.pgurl import SourceURL
from stages.copy.live import Snapshot, SourceBusy, SourceSettings
from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.errors import SourceUnreachable, TransientError
from stages.preflight.extensions import DEFAULT_EXTENSION_ALLOWLIST
from stages.preflight.live import check_live_source
from stages.preflight.targetinfo import describe_target
from tests.support import pg
from tests.support.api import api_client
from tests.support.muteproxy import mute_after_login
from tests.support.world import make_world

DEADLINE = 3
MARGIN = 10


def mute_source(port: int) -> SourceURL:
    return SourceURL.parse_source(f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable")


def checks_of(checks) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["status"], c["detail"]) for c in checks}


def never_answered(port: int, limit: str) -> str:
    return (
        f"the source database at 127.0.0.1:{port} did not answer within {limit}; it accepted the "
        "connection but stopped answering: check that it is not overloaded, locked, or behind a proxy "
        "that holds queries, then try again"
    )


@pytest.fixture
def inspector():
    """An unprivileged role that reads the target, as a project's own role does."""
    role = RoleLogin(f"capy_tst_inspector_{secrets.token_hex(3)}", "trust-auth-ignores-it")
    pg.admin(f'CREATE ROLE "{role.name}" LOGIN')
    yield role
    pg.admin(f'DROP ROLE "{role.name}"')


def test_preflight_returns_within_its_deadline_when_the_source_stops_answering(scratch_db, inspector):
    target = describe_target(
        ClusterAdmin(pg.ADMIN_URL),
        scratch_db("capytgt"),
        owner=inspector,
        recreate=False,
        storage_limit_bytes=1024**3,
        allowlist=DEFAULT_EXTENSION_ALLOWLIST,
    )
    with mute_after_login() as proxy:
        started = time.monotonic()
        report = check_live_source(
            mute_source(proxy.port), target, allow_private=True, timeout=10, deadline_seconds=DEADLINE
        )
        elapsed = time.monotonic() - started
        assert proxy.logged_in.is_set() and proxy.held.is_set()  # the login worked, the query hung
    assert elapsed < DEADLINE + MARGIN
    reachable = next(check for check in report.checks if check.name == "source_reachable")
    assert (reachable.status, reachable.detail) == (
        "fail",
        never_answered(proxy.port, f"{DEADLINE} s (the preflight deadline)"),
    )
    assert reachable.transient  # the worker's gate retries it
    assert not report.ok


def test_preflight_endpoint_answers_200_within_the_deadline(control_db, store):
    settings = control_db.replace(preflight_deadline_seconds=DEADLINE)
    world = make_world(settings)
    client = api_client(settings, store)
    with mute_after_login() as proxy:
        started = time.monotonic()
        resp = client.simulate_post(
            f"/v1/projects/{world.project.id}/imports/preflight",
            headers={"X-API-Key": world.key, "Content-Type": "application/json"},
            body=json.dumps({"source_url": mute_source(proxy.port).url()}),
        )
        elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    assert elapsed < DEADLINE + MARGIN
    body = resp.json["preflight"]
    assert body["ok"] is False
    checks = checks_of(body["checks"])
    assert checks["source_reachable"] == (
        "fail",
        never_answered(proxy.port, f"{DEADLINE} s (the preflight deadline)"),
    )
    assert checks["source_version_compatible"] == (
        "warn",
        "not checked: the source database could not be reached (see source_reachable)",
    )


def test_the_snapshot_fails_transiently_within_its_read_timeout():
    with mute_after_login() as proxy:
        started = time.monotonic()
        with (
            pytest.raises(SourceTimedOut) as info,
            Snapshot.open(mute_source(proxy.port), SourceSettings(connect_timeout=5, read_timeout=2)),
        ):
            pass
        elapsed = time.monotonic() - started
        assert proxy.held.is_set()
    assert elapsed < 2 + MARGIN
    assert isinstance(info.value, SourceUnreachable) and isinstance(info.value, TransientError)
    assert info.value.message == never_answered(
        proxy.port, "2 s (the source read timeout, CAPY_SOURCE_READ_TIMEOUT_SECONDS)"
    )


def test_reading_the_snapshots_catalog_is_bounded():
    # BEGIN, the four SETs and the snapshot export are answered; reading what to copy
    # (the catalog) never is.
    with mute_after_login(answered=6) as proxy:
        started = time.monotonic()
        with (
            pytest.raises(SourceTimedOut) as info,
            Snapshot.open(mute_source(proxy.port), SourceSettings(connect_timeout=5, read_timeout=2)),
        ):
            pass
        elapsed = time.monotonic() - started
        assert proxy.held.is_set()
    assert elapsed < 2 + MARGIN
    assert "did not answer within 2 s" in info.value.message


def test_a_guarded_connection_serves_an_honest_source_and_bounds_each_round_trip():
    source = SourceURL.parse_source(pg.url_for("postgres", sslmode="disable"))
    conn = connect(source, timeout=5, deadline=Deadline(per_read=2, what="test"))
    try:
        with conn.cursor() as cur:
            for _ in range(3):  # each round trip has its own 2 s, not all of them together
                cur.execute("SELECT pg_sleep(0.8)")
                cur.fetchone()
            conn.rollback()
            with pytest.raises(SourceTimedOut) as info:
                cur.execute("SELECT pg_sleep(30)")  # an honest but slow answer is cut off too
        assert "did not answer within 2 s (test)" in info.value.message
        assert conn.closed  # the socket was shut down: libpq saw the end of the connection
    finally:
        conn.close()


def test_an_expired_total_deadline_refuses_the_next_round_trip_without_sending_it():
    source = SourceURL.parse_source(pg.url_for("postgres", sslmode="disable"))
    conn = connect(source, timeout=5, deadline=Deadline(total=1, what="test"))
    try:
        time.sleep(1.2)
        with pytest.raises(SourceTimedOut), conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


def test_one_organization_cannot_take_every_web_thread_with_preflights(control_db, store):
    """Each preflight against a source that never answers holds a web thread until the
    deadline: past CAPY_ORG_MAX_CONCURRENT_PREFLIGHTS the organization gets a 429 at
    once, while another organization's preflight still runs."""
    import threading

    settings = control_db.replace(preflight_deadline_seconds=6, org_max_concurrent_preflights=2)
    tenant, other = make_world(settings), make_world(settings)
    client = api_client(settings, store)

    def preflight(world, port: int):
        return client.simulate_post(
            f"/v1/projects/{world.project.id}/imports/preflight",
            headers={"X-API-Key": world.key, "Content-Type": "application/json"},
            body=json.dumps({"source_url": mute_source(port).url()}),
        )

    with mute_after_login() as proxy:
        answers: list = []
        holders = [
            threading.Thread(target=lambda: answers.append(preflight(tenant, proxy.port))) for _ in range(2)
        ]
        for thread in holders:
            thread.start()
        assert proxy.held.wait(10)
        time.sleep(1)  # both holders are past their slot by now
        started = time.monotonic()
        refused = preflight(tenant, proxy.port)
        assert time.monotonic() - started < 3
        assert refused.status_code == 429, refused.text
        assert "2 preflights of this organization are already running" in refused.json["error"]
        assert refused.headers["Retry-After"] == "6"
        assert preflight(other, proxy.port).status_code == 200
        for thread in holders:
            thread.join(30)
    assert [answer.status_code for answer in answers] == [200, 200]
    assert preflight(tenant, 1).status_code == 200  # the slots were given back


def _locked_source(scratch_db) -> tuple[str, object]:
    """A source whose table another session of the source holds exclusively."""
    import psycopg2

    name = scratch_db("capysrc_locked")
    pg.psql(name, text="CREATE TABLE public.busy (id int); INSERT INTO public.busy VALUES (1);")
    holder = psycopg2.connect(pg.url_for(name))
    with holder.cursor() as cur:
        cur.execute("BEGIN; LOCK TABLE public.busy IN ACCESS EXCLUSIVE MODE")
    return name, holder


def test_a_table_locked_on_the_source_fails_the_snapshot_as_transient_after_the_lock_timeout(scratch_db):
    name, holder = _locked_source(scratch_db)
    try:
        started = time.monotonic()
        with (
            pytest.raises(SourceBusy, match="stayed locked for 2 s") as info,
            Snapshot.open(
                SourceURL.parse_source(pg.url_for(name, sslmode="disable")), SourceSettings(lock_timeout=2)
            ),
        ):
            pass
        assert time.monotonic() - started < 2 + MARGIN
        assert isinstance(info.value, TransientError)
    finally:
        holder.close()


def test_a_cancel_interrupts_the_snapshot_sessions_own_queries(scratch_db):
    """Locking the tables to copy is a query of the stage itself (no process a cancel
    kills): the cancel shuts its session's socket (never psycopg2's cancel(), which holds
    the GIL through a round trip to the source). The server notices the closed session
    when its lock wait ends (lock_timeout)."""
    import threading

    from stages.tools.commands import Cancellation

    name, holder = _locked_source(scratch_db)
    cancellation = Cancellation()
    outcome: dict = {}

    def open_snapshot() -> None:
        try:
            with Snapshot.open(
                SourceURL.parse_source(pg.url_for(name, sslmode="disable")),
                SourceSettings(lock_timeout=600),
                cancellation,
            ):
                pass
        except Exception as err:
            outcome["error"] = err

    try:
        thread = threading.Thread(target=open_snapshot, daemon=True)
        thread.start()
        waiting = "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE NOT l.granted AND c.relname = 'busy'"
        give_up = time.monotonic() + MARGIN
        while not pg.admin(waiting, dbname=name):  # locking the tables, waiting for the holder
            assert time.monotonic() < give_up and thread.is_alive()
            time.sleep(0.1)
        started = time.monotonic()
        cancellation.cancel("cancelled by a test")
        thread.join(MARGIN)
        assert not thread.is_alive(), "the snapshot session went on waiting after the cancel"
        assert time.monotonic() - started < MARGIN
        error = outcome["error"]
        assert isinstance(error, SourceTimedOut)
        assert (
            error.message
            == "the session with the source database at 127.0.0.1:5432 was interrupted: cancelled"
        )
    finally:
        holder.close()


def test_sizing_up_the_source_is_bounded():
    """The live fetch stage's estimate (stages.copy.live.size_up) reads the catalog
    without a snapshot: a source that stops answering mid-read fails it transiently."""
    from stages.copy.live import size_up

    # BEGIN, the four SETs and the server version are answered; the tables never are.
    with mute_after_login(answered=6) as proxy:
        with pytest.raises(SourceTimedOut) as info:
            size_up(mute_source(proxy.port), SourceSettings(connect_timeout=5, read_timeout=2))
        assert proxy.held.is_set()
    assert isinstance(info.value, TransientError)
    assert "did not answer within 2 s" in info.value.message
