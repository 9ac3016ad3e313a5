"""Fair share of the web's threads: at most a few synchronous preflights per organization.

A preflight may wait up to CAPY_PREFLIGHT_DEADLINE_SECONDS on a source that does not
answer; without a bound, one organization could keep every web thread waiting so. Each
running preflight holds one of the organization's slots, a session-level advisory lock
on the control database (two-key form: the organization's hash and the slot number),
so the bound holds across every web worker and is released even if the worker dies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipeline.db import database
from pipeline.errors import RateLimited


@contextlib.contextmanager
def preflight_slot(organization_id: str, *, slots: int, retry_after: int) -> Iterator[None]:
    """Hold one of `slots` preflight slots of the organization while the block runs, or
    raise RateLimited (429) when all are taken."""
    held = None
    for slot in range(slots):
        cursor = database.execute_sql(
            "SELECT pg_try_advisory_lock(hashtext(%s), %s)", (organization_id, slot)
        )
        if cursor.fetchone()[0]:
            held = slot
            break
    if held is None:
        raise RateLimited(
            f"{slots} preflights of this organization are already running (each takes up to "
            f"{retry_after} s against a source that does not answer); wait for one to finish and try again",
            retry_after=retry_after,
        )
    try:
        yield
    finally:
        database.execute_sql("SELECT pg_advisory_unlock(hashtext(%s), %s)", (organization_id, held))
