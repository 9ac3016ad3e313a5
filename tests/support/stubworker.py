"""The real stage actors on Dramatiq's StubBroker, served by a real Worker: the actor
options (retries, time limits, throws) run as in production, without RabbitMQ."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence

import dramatiq
from dramatiq.brokers.stub import StubBroker

from pipeline.config import Settings
from pipeline.queue import StageQueue
from pipeline.runner import Runner


class StageWorkers:
    """Starts stage workers on queues of their own; `stop_all` stops every one."""

    def __init__(self, base: Settings) -> None:
        self.base = base
        self.workers: list[dramatiq.Worker] = []

    def start(
        self,
        steps: object = None,
        *,
        steps_for: Callable[[Settings], object] | None = None,
        middleware: Sequence[dramatiq.Middleware] = (),
        **overrides: object,
    ) -> tuple[Settings, StageQueue, dramatiq.Worker]:
        """Workers on settings of their own (`overrides`), running `steps`, or the steps
        `steps_for` builds from those settings."""
        settings = self.base.replace(queue_prefix=f"stub_{secrets.token_hex(3)}", **overrides)
        broker = StubBroker()
        for item in middleware:
            broker.add_middleware(item)
        broker.emit_after("process_boot")  # as the dramatiq command does: starts the time limit's timer
        queue = StageQueue(broker, settings)
        runner = Runner(
            settings, steps_for(settings) if steps_for else steps, queue.wake, heartbeat_seconds=1
        )
        queue.handler, queue.on_exhausted = runner.run, runner.exhausted
        worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=1)
        worker.start()
        self.workers.append(worker)
        return settings, queue, worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=10_000)


@contextlib.contextmanager
def stage_workers(base: Settings) -> Iterator[StageWorkers]:
    """Stage workers started within the block, all stopped at its end."""
    workers = StageWorkers(base)
    try:
        yield workers
    finally:
        workers.stop_all()
