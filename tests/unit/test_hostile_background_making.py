"""Hostile review of the databases made in the background (stages.background): the
rehearsal database made ahead (Sandbox.ahead) and the preview made while the schema
is dumped (ImportSteps._preview_started). Their contract: whatever ended the block,
what the background made is there (or has failed) when it is left, so the caller's
cleanup finds and drops it, even when an exception raised in the caller's thread
(Dramatiq's time limit, a worker shutdown: raise_thread_exception) ends its wait."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded
from dramatiq.threading import raise_thread_exception

from pipeline.import_steps import ImportSteps
from stages.database.cluster import RoleLogin
from stages.preflight.sandbox import Sandbox


class SlowAdmin:
    """A cluster whose CREATE DATABASE takes a while (a checkpoint on a busy cluster)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.lock = threading.Lock()

    def _note(self, what: str, name: str) -> None:
        with self.lock:
            self.events.append((what, name))

    def ensure_restore_role(self, name: str) -> RoleLogin:
        self._note("role", name)
        return RoleLogin(name, "secret")

    def create_database(self, name: str, *, owner: str | None = None, spare: bool = False) -> None:
        self.gate.wait(10)
        self._note("create", name)

    def create_extensions(self, *args, **kwargs) -> None:
        return None

    def drop_database(self, name: str) -> None:
        self._note("drop", name)

    def drop_role(self, name: str) -> None:
        self._note("drop role", name)

    def role_url(self, dbname, login):
        return f"postgresql://{login.name}@127.0.0.1/{dbname}"

    def left_behind(self) -> set[str]:
        """Databases whose last event is their creation: nothing dropped them after."""
        last: dict[str, str] = {}
        for what, name in self.events:
            if what in ("create", "drop"):
                last[name] = what
        return {name for name, what in last.items() if what == "create"}


def _interrupt_after(thread: threading.Thread, seconds: float) -> None:
    time.sleep(seconds)
    raise_thread_exception(thread.ident, TimeLimitExceeded)


def _run_interrupted(body, admin: SlowAdmin) -> list[BaseException]:
    """Run `body`, interrupt it while the database is being made, and let the CREATE
    DATABASE finish a little later (as it does on a busy cluster)."""
    raised: list[BaseException] = []
    threading.Timer(1.0, admin.gate.set).start()

    def run() -> None:
        try:
            body()
        except BaseException as err:  # noqa: BLE001
            raised.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    _interrupt_after(thread, 0.4)
    thread.join(10)
    assert not thread.is_alive()
    return raised


def test_a_database_made_ahead_is_dropped_even_when_the_wait_for_it_is_interrupted():
    admin = SlowAdmin()
    sandbox = Sandbox(admin, background=False)  # type: ignore[arg-type]

    def body() -> None:
        with sandbox.ahead():
            pass  # the source was unreachable: no rehearsal took the database

    raised = _run_interrupted(body, admin)
    assert raised and isinstance(raised[0], TimeLimitExceeded)
    time.sleep(0.5)
    assert admin.left_behind() == set(), admin.events


def test_a_rehearsal_interrupted_while_it_waits_for_the_database_made_ahead_leaves_nothing():
    admin = SlowAdmin()
    sandbox = Sandbox(admin, background=False)  # type: ignore[arg-type]

    def body() -> None:
        with sandbox.ahead(), sandbox.database({}):
            pass

    raised = _run_interrupted(body, admin)
    assert raised and isinstance(raised[0], TimeLimitExceeded)
    time.sleep(0.5)
    # Sandbox.database dropped the name before the background had created it.
    assert admin.left_behind() == set(), admin.events


def test_the_preview_made_in_the_background_exists_before_the_failed_stage_cleans_up():
    admin = SlowAdmin()
    job = SimpleNamespace(id="job_hostile1")
    steps = SimpleNamespace(_admin=lambda _job: admin)
    context = SimpleNamespace(
        job=job, set_preview=lambda _p: None, progress=lambda _p: None, confirm_claim=lambda: None
    )

    def body() -> None:
        with ImportSteps._preview_started(steps, context):  # type: ignore[arg-type]
            pass  # the schema dump failed at once

    raised = _run_interrupted(body, admin)
    assert raised and isinstance(raised[0], TimeLimitExceeded)
    admin.drop_database("capy_preview_hostile1")  # the Runner's cleanup after the failure
    time.sleep(0.5)
    assert admin.left_behind() == set(), admin.events


def _first_wait_interrupted(monkeypatch) -> None:
    """The first Background.join raises a time limit at once, before it waits: where an
    exception raised in the thread lands if it comes a few instructions early."""
    from stages.background import Background

    real = Background.join
    calls: list[int] = []

    def join(self) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise TimeLimitExceeded()
        real(self)

    monkeypatch.setattr(Background, "join", join)


def _settle_entered_interrupted(monkeypatch) -> None:
    """Background.settle raises a time limit as it is entered, before its own `try`:
    Python checks for an exception raised in a thread as a function is entered (seen
    once in CI, on a busy machine, as a drop before the CREATE DATABASE it follows)."""
    from stages.background import Background

    def settle(self) -> None:
        raise TimeLimitExceeded()

    monkeypatch.setattr(Background, "settle", settle)


LANDINGS = pytest.mark.parametrize(
    "land", [_first_wait_interrupted, _settle_entered_interrupted], ids=["first-wait", "settle-entered"]
)


def _left_by_a_time_limit(block) -> None:
    """Enter and leave `block` while the making is held back (half a second), as a
    stage whose time limit lands on its way out; the limit must reach the caller."""
    try:
        with block:
            pass
    except TimeLimitExceeded:
        pass
    else:
        raise AssertionError("the time limit was swallowed")


@LANDINGS
def test_an_exception_landing_before_the_wait_for_the_database_made_ahead_still_drops_it_after(
    monkeypatch, land
):
    land(monkeypatch)
    admin = SlowAdmin()
    sandbox = Sandbox(admin, background=False)  # type: ignore[arg-type]
    threading.Timer(0.5, admin.gate.set).start()
    _left_by_a_time_limit(sandbox.ahead())
    assert [what for what, _name in admin.events] == ["role", "create", "drop", "drop role"]


@LANDINGS
def test_an_exception_landing_before_the_wait_for_the_preview_still_waits_for_it(monkeypatch, land):
    land(monkeypatch)
    admin = SlowAdmin()
    job = SimpleNamespace(id="job_hostile2")
    steps = SimpleNamespace(_admin=lambda _job: admin)
    context = SimpleNamespace(
        job=job, set_preview=lambda _p: None, progress=lambda _p: None, confirm_claim=lambda: None
    )
    threading.Timer(0.5, admin.gate.set).start()
    _left_by_a_time_limit(ImportSteps._preview_started(steps, context))  # type: ignore[arg-type]
    # The stage's cleanup runs after this: the preview exists by then.
    assert [what for what, _name in admin.events] == ["drop", "role", "create"]
