"""A dramatiq module for `dramatiq tests.support.slow_drop_worker` (the real CLI, as the
Procfile runs `pipeline.worker`): its broker is a stub (no RabbitMQ), and on import it
queues one message that runs a schema rehearsal's sandbox whose role drop is slow
(SLOW_DROP_DROP_SECONDS), then writes the rehearsal's name to SLOW_DROP_OUT.

So a test can SIGTERM the process right after a "preflight" while its drop still runs
in the background, exactly as a worker stopped after a preflight stage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramatiq
from dramatiq.brokers.stub import StubBroker

import stages.background
from stages.database.cluster import ClusterAdmin
from stages.preflight.sandbox import Sandbox

broker = StubBroker()
dramatiq.set_broker(broker)
# How long a stopping process finishes its background work (20 s; shorter in a test).
stages.background.EXIT_WAIT_SECONDS = float(os.environ.get("SLOW_DROP_EXIT_WAIT", "20"))


class SlowDrops(ClusterAdmin):
    def drop_role(self, name: str) -> None:
        time.sleep(float(os.environ.get("SLOW_DROP_DROP_SECONDS", "5")))
        super().drop_role(name)


@dramatiq.actor(max_retries=0)
def rehearse() -> None:
    with Sandbox(SlowDrops(os.environ["SLOW_DROP_ADMIN_URL"])).database({}) as scratch:
        pass
    Path(os.environ["SLOW_DROP_OUT"]).write_text(scratch.database)


if os.environ.get("SLOW_DROP_OUT") and not Path(os.environ["SLOW_DROP_OUT"]).exists():
    rehearse.send()
