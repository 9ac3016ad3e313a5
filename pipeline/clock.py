"""`capy-imports clock`: runs `sweep` every N seconds, for the Procfile's `clock` line.

Each round's summary is printed (one line per action, or one JSON object with
`--json`); a round that fails is logged and the next one runs anyway. SIGTERM or
SIGINT ends the loop between rounds (or its wait), and the command exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def run_clock(
    every: float,
    round_: Callable[[], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    *,
    stop: threading.Event | None = None,
    rounds: int | None = None,
) -> int:
    """Call `round_` every `every` seconds and `report` its summary, until `stop` is set
    (by SIGTERM/SIGINT when `stop` is not given) or after `rounds` rounds; returns how
    many rounds ran."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: stop.set())
    done = 0
    while not stop.is_set():
        try:
            report(round_())
        except Exception as err:  # a database or broker blip: the next round tries again
            log.exception("sweep failed")
            report({"errors": [f"sweep failed: {err}"]})
        done += 1
        if rounds is not None and done >= rounds:
            break
        stop.wait(every)
    log.info("clock stopped after %d round(s)", done)
    return done
