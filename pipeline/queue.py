"""The queue: one Dramatiq actor per stage, on RabbitMQ, and the wake-ups between them.

Messages carry only a job ID: the job table says what to do, so a duplicate or
redelivered message finds the job past its stage and does nothing. `set_broker` is
called only by `make_broker`, at the edge (the WSGI factory and the worker module).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dramatiq
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from pipeline import logs
from pipeline.config import Settings
from pipeline.db import ControlDatabaseUnavailable
from pipeline.steps.registry import STAGE_NAMES
from stages.errors import PermanentError, TransientError

# The queues an instance declares under its CAPY_QUEUE_PREFIX besides the stages': jobs
# whose stage ran out of retries, and webhook deliveries (pipeline.webhooks.queue).
EXHAUSTED_QUEUE = "exhausted"
WEBHOOKS_QUEUE = "webhooks"
# dramatiq's RabbitMQ broker declares each queue with a delay queue and a dead-letter queue.
QUEUE_VARIANTS = ("", ".DQ", ".XQ")


def declared_queues(prefix: str) -> list[str]:
    """Every RabbitMQ queue an instance whose queue prefix is `prefix` may declare: each
    stage's, the exhausted jobs', the webhook deliveries', each with its delay and
    dead-letter queue. What the test suites and the bench delete when they are done."""
    return [
        f"{prefix}.{name}{variant}"
        for name in (*STAGE_NAMES, EXHAUSTED_QUEUE, WEBHOOKS_QUEUE)
        for variant in QUEUE_VARIANTS
    ]


log = logging.getLogger(__name__)

# The web's connection attempts: a broker that does not complete TCP within this is down.
PUBLISHER_CONNECT_TIMEOUT_SECONDS = 3
# How often a stage's message is retried while the control database is away: the
# backoff doubles from CAPY_RETRY_BACKOFF_SECONDS to 5 min, 45 to 90 min in all at 5 s.
# Such retries use none of the job's attempts: nothing of the job could be run or recorded.
CONTROL_DATABASE_RETRIES = 22
# The longest wait between two runs of a stage's message (Dramatiq doubles the first,
# CAPY_RETRY_BACKOFF_SECONDS, up to this).
MAX_BACKOFF_MS = 300_000


def _retried(retries: int, exc: BaseException, max_attempts: int) -> bool:
    """Whether Dramatiq retries a stage's message after `exc` (its `retries` so far)."""
    if isinstance(exc, ControlDatabaseUnavailable):
        return retries < CONTROL_DATABASE_RETRIES
    return isinstance(exc, TransientError) and retries < max_attempts - 1


Handler = Callable[[str, str], None]
ExhaustedHandler = Callable[[str, str], None]


def make_broker(settings: Settings, *, publisher: bool = False) -> RabbitmqBroker:
    """A RabbitMQ broker with publisher confirms; connects lazily, on first use.

    `publisher` (the web process, which only publishes, through its Dispatcher): every
    wait on the broker is bounded — connecting (socket and handshake timeouts) and a
    connection RabbitMQ keeps blocked (`blocked_connection_timeout`). Workers keep pika's
    defaults: their consumer connections must not be recycled during a resource alarm.
    Parameters the URL sets itself (e.g. `?heartbeat=`) are left as the URL says.
    """
    broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=True)
    if publisher:
        query = parse_qs(urlsplit(settings.broker_url).query)
        parameters = broker.parameters if isinstance(broker.parameters, list) else [broker.parameters]
        for params in parameters:
            if "blocked_connection_timeout" not in query:
                params.blocked_connection_timeout = settings.broker_blocked_timeout_seconds
            if "socket_timeout" not in query:
                params.socket_timeout = PUBLISHER_CONNECT_TIMEOUT_SECONDS
            if "stack_timeout" not in query:
                params.stack_timeout = PUBLISHER_CONNECT_TIMEOUT_SECONDS + 2
            params.connection_attempts = 1
    dramatiq.set_broker(broker)
    return broker


class StageQueue:
    """Declares the stage actors on `broker` and sends wake-ups to them.

    `handler(job_id, stage)` runs a stage (the worker passes the Runner's; the API
    passes none and only sends). A TransientError raised by the handler is retried
    with exponential backoff by Dramatiq's Retries middleware; when retries run out,
    `on_exhausted(job_id, stage)` is called.
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        settings: Settings,
        handler: Handler | None = None,
        on_exhausted: ExhaustedHandler | None = None,
    ) -> None:
        self.broker = broker
        self.prefix = settings.queue_prefix
        self.handler = handler
        self.on_exhausted = on_exhausted
        exhausted_name = f"{self.prefix}_stage_retries_exhausted"
        self.exhausted_actor = dramatiq.actor(
            broker=broker,
            actor_name=exhausted_name,
            queue_name=f"{self.prefix}.{EXHAUSTED_QUEUE}",
            max_retries=3,
        )(self._exhausted)
        self.actors: dict[str, dramatiq.Actor[[str], None]] = {}
        for stage in STAGE_NAMES:  # one actor and queue per stage of the registry
            self.actors[stage] = dramatiq.actor(
                broker=broker,
                actor_name=f"{self.prefix}_{stage}",
                queue_name=f"{self.prefix}.{stage}",
                # Attempts are also bounded by the job's own max_attempts at claim.
                max_retries=max(0, settings.max_attempts - 1),
                min_backoff=settings.retry_backoff_seconds * 1000,
                max_backoff=MAX_BACKOFF_MS,
                retry_when=lambda retries, exc: _retried(retries, exc, settings.max_attempts),
                throws=(PermanentError,),
                # Below the broker's consumer_timeout (Settings.checked): a stage is
                # stopped, and its message settled, before RabbitMQ takes it back.
                time_limit=settings.stage_time_limit_seconds * 1000,
                # On SIGTERM the stage is interrupted at once (its tools stopped) and hands
                # its claim back (Runner), so a deploy does not wait for the lease.
                notify_shutdown=True,
                on_retry_exhausted=exhausted_name,
            )(self._runner_for(stage))

    def queue_names(self) -> list[str]:
        return [actor.queue_name for actor in self.actors.values()] + [self.exhausted_actor.queue_name]

    def _runner_for(self, stage: str) -> Callable[[str], None]:
        def run(job_id: str) -> None:
            if self.handler is None:
                raise RuntimeError("this process only sends messages")
            self.handler(job_id, stage)

        run.__name__ = f"run_{stage}"
        return run

    def _exhausted(self, message: dict[str, Any], retry_info: dict[str, Any] | None = None) -> None:
        if self.on_exhausted is None:
            return
        stage = message.get("actor_name", "").removeprefix(f"{self.prefix}_")
        job_id = (message.get("args") or [""])[0]
        with logs.bound(job_id=job_id, stage=stage):
            self.on_exhausted(job_id, stage)

    def wake(self, job_id: str, stage: str, delay_ms: int = 0) -> None:
        """Enqueue the stage's actor for the job, to run no sooner than `delay_ms` from
        now; TransientError if the broker is down."""
        try:
            self.actors[stage].send_with_options(args=(job_id,), delay=delay_ms or None)
        except (dramatiq.errors.BrokerConnectionError, pika.exceptions.AMQPError, OSError) as err:
            raise TransientError(f"could not enqueue the {stage} stage: the broker is unavailable") from err
