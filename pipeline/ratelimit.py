"""Per-credential rate limits, shared by every web worker through the control database.

A fixed one-minute window per credential (an API key, a Clerk user): each request is an
atomic upsert that returns the window's count, so concurrent workers never lose a hit.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

from pipeline.db import database
from pipeline.errors import RateLimited
from pipeline.models import utcnow

WINDOW_SECONDS = 60

_HIT = (
    "INSERT INTO rate_limits (credential, window_start, hits) VALUES (%s, %s, 1) "
    "ON CONFLICT (credential, window_start) DO UPDATE SET hits = rate_limits.hits + 1 "
    "RETURNING hits"
)
_FORGET = "DELETE FROM rate_limits WHERE window_start < %s"


class RateLimiter:
    """At most `per_minute` requests per credential per window; 0 turns the limit off."""

    def __init__(self, per_minute: int, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.per_minute = per_minute
        self.clock = clock

    def hit(self, credential: str) -> None:
        """Count one request; RateLimited (with Retry-After seconds) once over the limit."""
        if self.per_minute <= 0:
            return
        now = self.clock()
        epoch = now.timestamp()
        start = dt.datetime.fromtimestamp(epoch - epoch % WINDOW_SECONDS, dt.UTC)
        with database.atomic():
            hits = database.execute_sql(_HIT, (credential, start)).fetchone()[0]
            if hits == 1:
                # First request of a credential's window: windows before the previous one
                # (kept for clocks a little apart) count for nobody any more.
                database.execute_sql(_FORGET, (start - dt.timedelta(seconds=WINDOW_SECONDS),))
        if hits > self.per_minute:
            retry_after = max(1, math.ceil(start.timestamp() + WINDOW_SECONDS - epoch))
            raise RateLimited(
                f"rate limit exceeded: at most {self.per_minute} requests per minute with these "
                f"credentials; retry in {retry_after} s",
                retry_after,
            )
