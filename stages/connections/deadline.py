"""Wall-clock deadlines on every round trip to a source, enforced at the socket.

libpq waits for a server's answer in poll() without a timeout. TCP keepalives and
`tcp_user_timeout` end that wait only when the peer's TCP stops acknowledging;
`statement_timeout` bounds honest servers only. A server that accepts the login, keeps
acknowledging and never answers (hostile, or a wedged proxy) would hold the thread —
a web worker, or a stage — forever, and libpq cannot be interrupted from Python.

Why a watchdog that shuts the socket down, rather than psycopg2's alternatives:
`psycopg2.extensions.set_wait_callback` is process-wide (it would change every
connection, the control database's too), and async connections (`async_=1`) have no
transactions, no `set_session`, no `with` blocks, which preflight and the copy's
snapshot (stages.copy.engine) rely on.
Instead, while a round trip runs, a timer waits for the deadline; when it passes, the
timer calls `shutdown(SHUT_RDWR)` on the connection's socket through a duplicate of its
file descriptor. libpq's blocked read returns end-of-file, psycopg2 raises
OperationalError, and the guard turns that into `SourceTimedOut` (transient). The
duplicate is taken when the connection is guarded, while libpq's descriptor is
certainly open, so a descriptor number reused after libpq closed it can never be hit;
shutting down a socket that libpq has already closed does nothing to anyone else.

`GuardedConnection` applies the deadline to everything that waits for the server:
`cursor.execute` (client-side cursors receive the whole result in it), `commit`,
`rollback`. Connecting is bounded by libpq's own `connect_timeout`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions

from stages.errors import SourceUnreachable


class SourceTimedOut(SourceUnreachable):
    """The source did not answer in time."""


class Deadline:
    """How long a source may take: `per_read` seconds for each round trip, and/or
    `total` seconds from now for all of them. `what` names the limit in messages."""

    def __init__(
        self,
        *,
        per_read: float | None = None,
        total: float | None = None,
        what: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_read is None and total is None:
            raise ValueError("a deadline needs per_read or total")
        self.per_read = per_read
        self.total = total
        self.what = what
        self.clock = clock
        self.expires_at = None if total is None else clock() + total
        self.cancelled = False
        self._watchdogs: list[Watchdog] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """End the deadline now (the work it bounds was cancelled): every round trip
        under it is interrupted at once and none starts."""
        with self._lock:
            self.cancelled = True
            watchdogs = list(self._watchdogs)
        for watchdog in watchdogs:
            watchdog.fire()

    def watch(self, watchdog: Watchdog) -> None:
        with self._lock:
            self._watchdogs.append(watchdog)
            cancelled = self.cancelled
        if cancelled:
            watchdog.fire()

    def remaining(self) -> float:
        """Seconds the next round trip may take (0 or less: none left)."""
        if self.cancelled:
            return 0.0
        budgets = []
        if self.per_read is not None:
            budgets.append(self.per_read)
        if self.expires_at is not None:
            budgets.append(self.expires_at - self.clock())
        return min(budgets)

    def connect_timeout(self, timeout: int) -> int:
        """libpq's connect_timeout (whole seconds, at least 2) within what is left."""
        if self.expires_at is None:
            return timeout
        return max(2, min(timeout, math.ceil(self.expires_at - self.clock())))

    def limit(self) -> str:
        """ "20 s (the preflight deadline)" — the limit a timeout message names."""
        seconds = self.total if self.total is not None else self.per_read
        shown = f"{seconds:g} s"
        return f"{shown} ({self.what})" if self.what else shown


class Watchdog:
    """Shuts one connection's socket down when a round trip outlives its deadline."""

    def __init__(self, conn: psycopg2.extensions.connection, deadline: Deadline, *, where: str) -> None:
        self.deadline = deadline
        self.where = where
        self.fired = False
        self._lock = threading.Lock()
        self._released = False
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        deadline.watch(self)

    def expired(self) -> SourceTimedOut:
        if self.deadline.cancelled:
            return SourceTimedOut(
                f"the session with the source database at {self.where} was interrupted: cancelled"
            )
        return SourceTimedOut(
            f"the source database at {self.where} did not answer within {self.deadline.limit()}; "
            "it accepted the connection but stopped answering: check that it is not overloaded, "
            "locked, or behind a proxy that holds queries, then try again"
        )

    @contextlib.contextmanager
    def round_trip(self) -> Iterator[None]:
        budget = self.deadline.remaining()
        if self.fired or budget <= 0:
            raise self.expired()
        timer = threading.Timer(budget, self.fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except psycopg2.Error as err:
            if self.fired:
                raise self.expired() from err
            raise
        finally:
            timer.cancel()
        if self.fired:  # the answer and the deadline came together: the socket is gone
            raise self.expired()

    def fire(self) -> None:
        """Shut the socket down: the round trip under way (or the next) fails."""
        with self._lock:
            if self._released:
                return
            self.fired = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        with self._lock:
            self._released = True
            self._sock.close()


class GuardedCursor(psycopg2.extensions.cursor):
    """A client-side cursor whose `execute` (the whole round trip) has a deadline.

    Only `execute` is guarded: it is all that source reads use. `copy_expert`,
    `executemany`, `callproc` and named (server-side) cursors would need guarding too
    before a source read could use them."""

    # Only a GuardedConnection makes these (its cursor_factory).
    connection: GuardedConnection

    def execute(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - psycopg2's name
        with self.connection.round_trip():
            return super().execute(query, vars)


class GuardedConnection(psycopg2.extensions.connection):
    """A psycopg2 connection (pass as `connection_factory`) whose round trips are bounded
    once `guard()` has given it a deadline; its cursors are `GuardedCursor`s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = GuardedCursor
        self.watchdog: Watchdog | None = None

    def guard(self, deadline: Deadline, *, where: str) -> None:
        self.watchdog = Watchdog(self, deadline, where=where)

    def round_trip(self) -> contextlib.AbstractContextManager[None]:
        return self.watchdog.round_trip() if self.watchdog else contextlib.nullcontext()

    def commit(self) -> None:
        with self.round_trip():
            super().commit()

    def rollback(self) -> None:
        with self.round_trip():
            super().rollback()

    def close(self) -> None:
        super().close()
        if self.watchdog is not None:
            self.watchdog.release()
