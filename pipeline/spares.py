"""Keeping each project cluster's spare databases (stages.database.spares) at
CAPY_SPARE_DATABASES: after every job a worker ends, in the background (the job has
ended: nobody waits for it), and at every `capy-imports sweep` (the clock), which also
fills a cluster's spares after the service starts and drops the surplus when the
setting is lowered (with 0, workers keep none and the sweep drops any left)."""

from __future__ import annotations

import logging
import threading

from stages.background import start_held
from stages.database.cluster import ClusterAdmin

log = logging.getLogger(__name__)

_keeping: set[str] = set()  # clusters whose spares a thread of this process is keeping
_lock = threading.Lock()


def keep(admin: ClusterAdmin, count: int) -> tuple[list[str], list[str]]:
    """Make or drop spares until the cluster holds `count`: (made, dropped)."""
    made, dropped = admin.keep_spares(count)
    if made or dropped:
        log.info("spare databases: made %d, dropped %d", len(made), len(dropped))
    return made, dropped


def keep_in_background(cluster_id: str, admin: ClusterAdmin, count: int) -> threading.Thread | None:
    """`keep` in a thread of its own, unless one of this process already keeps that
    cluster's spares; failures are logged (the next job or sweep tries again)."""
    with _lock:
        if cluster_id in _keeping:
            return None
        _keeping.add(cluster_id)

    def run() -> None:
        try:
            keep(admin, count)
        except Exception as err:  # noqa: BLE001 - spares are an optimization: never an error of a job
            log.warning("could not keep the spare databases of cluster %s: %s", cluster_id, err)
        finally:
            with _lock:
                _keeping.discard(cluster_id)

    return start_held(run, name=f"spares-{cluster_id}")  # a worker stopped meanwhile finishes it
