"""What a process of the service finishes on its way out (SIGTERM, once its running
messages or requests have ended): the work it started in threads of its own that no job
or request waits for. Those threads die with the process, and what they left half done
waits for `capy-imports sweep`:

- a schema rehearsal's database and role, dropped after the rehearsal's result is known
  (stages.preflight.sandbox; the sweep drops them after an hour);
- a cluster's spare databases, made or dropped after a job ends (pipeline.spares; the
  sweep drops a half-made one).

The worker waits through `FinishBackgroundWork` (dramatiq's worker shutdown), the web
process through gunicorn's `worker_exit` hook (app.gunicorn_conf); both for at most
`EXIT_WAIT_SECONDS` in all, within the 30 s each is given to stop.
"""

from __future__ import annotations

import time

import dramatiq

from pipeline import spares
from stages.preflight import sandbox

EXIT_WAIT_SECONDS = 20.0


def finish_background_work(timeout: float = EXIT_WAIT_SECONDS) -> None:
    """Wait for this process's rehearsal drops and spare keeping, at most `timeout` in all."""
    deadline = time.monotonic() + timeout
    sandbox.wait_for_drops(max(0.0, deadline - time.monotonic()))
    spares.wait_for_keeping(max(0.0, deadline - time.monotonic()))


class FinishBackgroundWork(dramatiq.Middleware):
    """A worker process on its way out finishes its background work (above), after its
    worker threads have stopped and before the process exits."""

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        finish_background_work()
