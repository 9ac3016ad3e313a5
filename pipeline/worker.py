"""The worker process: `dramatiq pipeline.worker` (see Procfile).

Dramatiq imports this module and uses the broker it sets; that is why the environment
is read here, at import, and nowhere else in the worker. What it runs is built by the
composition root, `pipeline.services.worker`.
"""

from __future__ import annotations

import logging

from pipeline import logs, services
from pipeline.config import ConfigError, Settings
from pipeline.queue import StageQueue

log = logging.getLogger("pipeline.worker")


def _build_from_env() -> StageQueue:
    try:
        return services.worker(Settings.from_env())
    except ConfigError as err:
        # One readable line instead of a traceback; dramatiq then stops its other processes.
        logs.configure()
        log.critical("the worker cannot start: %s", err)
        raise SystemExit(2) from None


queue = _build_from_env()
broker = queue.broker
