"""Throw-away databases on the project's cluster, for the schema rehearsal.

A rehearsal database is made the way an import's preview is (stages.database.cluster): a fresh
database from template0, owned by a role of its own with exactly a restore role's
privileges (no superuser, CREATEDB, CREATEROLE or REPLICATION; a member of no role),
the allowlisted extensions created first by the admin. Both are named
``capy_rehearsal_<unix time>_<random>`` and dropped when the rehearsal ends, whatever
ended it; `capy-imports sweep` drops any a killed process left behind once they are
older than `STALE_AFTER_SECONDS` (the time tells it, no record is needed).

A preflight can have the database made ahead (`Sandbox.ahead`), in a thread of its own,
while it checks the source and dumps the schema. The drop runs in a thread of its own, after the rehearsal's result is known: DROP
DATABASE waits for a checkpoint of the cluster (a fraction of a second, more on a busy
one), which no preflight should wait for; a process on its way out finishes it first (up
to 20 s: stages.background.start_held). `wait_for_drops` waits for those under way.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from stages.background import Background, start_held
from stages.database.cluster import ClusterAdmin, RoleLogin

log = logging.getLogger(__name__)

REHEARSAL_PREFIX = "capy_rehearsal_"
# Far longer than any rehearsal may run (the stage time limit is 25 min).
STALE_AFTER_SECONDS = 3600


def rehearsal_name(clock: Callable[[], float] = time.time) -> str:
    return f"{REHEARSAL_PREFIX}{int(clock())}_{secrets.token_hex(4)}"


def is_stale(name: str, now: float, *, after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether `name` is a rehearsal database or role made more than `after` seconds
    before `now` (a name of another shape is never stale: it is not ours)."""
    stamp, _, rest = name.removeprefix(REHEARSAL_PREFIX).partition("_")
    if not name.startswith(REHEARSAL_PREFIX) or not stamp.isdigit() or not rest:
        return False
    return now - int(stamp) > after


@dataclass(frozen=True)
class Scratch:
    """One rehearsal database and the role that owns it."""

    admin: ClusterAdmin
    database: str
    login: RoleLogin


class Sandbox:
    """Makes rehearsal databases on one cluster (`admin`)."""

    def __init__(
        self, admin: ClusterAdmin, *, clock: Callable[[], float] = time.time, background: bool = True
    ) -> None:
        self.admin = admin
        self.clock = clock
        self.background = background
        self._ahead: tuple[str, Background[RoleLogin]] | None = None

    @contextlib.contextmanager
    def ahead(self) -> Iterator[None]:
        """Within it, the next `database` is one whose making (role and database, a
        tenth of a second or more) started on entry, in the background, while the
        caller checks the source and dumps its schema. Dropped on the way out if no
        rehearsal took it."""
        name = rehearsal_name(self.clock)

        def make() -> RoleLogin:
            login = self.admin.ensure_restore_role(name)
            self.admin.create_database(name, owner=login.name, spare=True)
            return login

        self._ahead = (name, Background(make, name=f"make-{name}"))
        try:
            yield
        finally:
            unused, self._ahead = self._ahead, None
            if unused is not None:
                self._drop(name, after=unused[1])

    @contextlib.contextmanager
    def database(self, extensions: Mapping[str, str]) -> Iterator[Scratch]:
        """A fresh rehearsal database with `extensions` (name -> schema) created,
        dropped with its role on the way out (errors, timeouts and cancels included)."""
        ahead, self._ahead = self._ahead, None
        name = rehearsal_name(self.clock) if ahead is None else ahead[0]
        try:
            if ahead is None:
                login = self.admin.ensure_restore_role(name)
                self.admin.create_database(name, owner=login.name, spare=True)
            else:
                login = ahead[1].result()  # made or failed: either way this block drops it
            self.admin.create_extensions(name, login.name, extensions)
            yield Scratch(self.admin, name, login)
        finally:
            self._drop(name, after=None if ahead is None else ahead[1])

    def _drop(self, name: str, *, after: Background[RoleLogin] | None = None) -> None:
        """Drop `name` (in the background, unless the sandbox says not to), once what
        makes it (`after`) is done: an exception raised in this thread (a time limit)
        may land before any earlier wait for it began, and a drop before the CREATE
        DATABASE would leave the database behind."""
        try:
            if after is not None:
                after.settle()
        finally:
            if after is not None:
                # Python delivers such an exception as a function is entered: one landing
                # as `settle` was called ended it before its own wait.
                after.join()
            if self.background:
                _start_drop(self, name)
            else:
                self.drop(name)

    def drop(self, name: str) -> None:
        """Drop a rehearsal database and its role; a failure is logged, and left to the
        sweep (a rehearsal's result does not depend on its cleanup)."""
        for what, drop in (("database", self.admin.drop_database), ("role", self.admin.drop_role)):
            try:
                drop(name)
            except Exception:  # the sweep retries; the caller's own error matters more
                log.exception("could not drop the rehearsal %s %s", what, name)


_dropping: set[threading.Thread] = set()
_dropping_lock = threading.Lock()


def _start_drop(sandbox: Sandbox, name: str) -> None:
    def run() -> None:
        try:
            sandbox.drop(name)
        finally:
            with _dropping_lock:
                _dropping.discard(thread)

    with _dropping_lock:
        thread = start_held(run, name=f"drop-{name}")
        _dropping.add(thread)


def wait_for_drops(timeout: float = 60.0) -> None:
    """Wait for the rehearsal databases being dropped in the background (tests)."""
    deadline = time.monotonic() + timeout
    while True:
        with _dropping_lock:
            threads = list(_dropping)
        if not threads:
            return
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if time.monotonic() >= deadline:
            return
