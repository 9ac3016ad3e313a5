"""The web process's publisher: one thread owns the broker connection; the job row is the outbox.

**One thread.** pika's BlockingConnection is not thread-safe, and it answers RabbitMQ's
heartbeats only while someone calls into it. gunicorn's gthread workers serve requests
on several threads, and a web process can sit idle for minutes: a connection per
request thread, touched only when a request comes, is found dead by the next one
(missed heartbeats, a broker restart). So each web process has one dispatcher thread
that owns its connection: it publishes what request threads hand it, services
heartbeats between publishes (every TICK_SECONDS), notices `connection.blocked`,
reconnects after a lost connection, and answers readiness checks with a real round trip.
Request threads never touch pika; they wait for the dispatcher at most `deadline` seconds.

**202, not 503, when the broker does not confirm in time.** The job row is committed
before its wake-up is published (the job table is the truth; messages are wake-ups), so
it is the outbox: a publish that fails or is not confirmed within the deadline stays
queued here and is retried with backoff for RETRY_FOR_SECONDS, and `capy-imports sweep`
(the Procfile's clock) re-wakes any pending job that was never published after that.
The POST answers 202 with the pending job, its `progress` saying it is queued for
dispatch. Failing the request instead (503) would need the committed job removed while
a publish may still be in flight — a broker that blocks publishers accepts the message
and confirms it later — and would make the client's retry race that message; with the
outbox the client keeps one job, the same Idempotency-Key keeps returning it, and
nothing is left behind unqueued.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from stages.errors import TransientError

log = logging.getLogger(__name__)

# How often the dispatcher services its connection (heartbeats, blocked notices) when idle.
TICK_SECONDS = 0.25
# How long a wake-up the broker refused is retried in process; the sweep takes over after.
RETRY_FOR_SECONDS = 300
MAX_BACKOFF_SECONDS = 30
# Wake-ups waiting for the dispatcher, at most; past it a POST is answered at once (the
# sweep dispatches the job), so an outage cannot grow a web process's memory.
MAX_WAITING = 1000

# No queue is bound to it: a readiness probe's message is confirmed and dropped.
READINESS_ROUTING_KEY = "capy-imports.readiness.probe"
BLOCKED = "RabbitMQ is blocking publishers (connection.blocked: a memory or disk alarm)"


class DispatchDelayed(TransientError):
    """The broker did not confirm the wake-up in time; the job stays queued for dispatch."""


class BrokerUnavailable(TransientError):
    """Publishing to the broker would not work now."""


@dataclass(eq=False)
class _Request:
    kind: str  # "publish" or "check"
    job_id: str = ""
    stage: str = ""
    since: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    attempts: int = 0
    due: float = 0.0


class Dispatcher:
    """Publishes stage wake-ups for request threads through one thread of its own.

    `actors` maps a stage to its Dramatiq actor (StageQueue.actors) on `broker`, which
    this dispatcher's thread alone uses in this process. The thread starts on first use
    (never at import or in a process gunicorn forks from).
    """

    def __init__(
        self,
        broker: RabbitmqBroker,
        actors: dict[str, dramatiq.Actor[[str], None]],
        *,
        deadline: float,
        retry_for: float = RETRY_FOR_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.actors = actors
        self.deadline = deadline
        self.retry_for = retry_for
        self.clock = clock
        self._inbox: queue.Queue[_Request] = queue.Queue(maxsize=MAX_WAITING)
        self._retries: list[_Request] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._connection: Any = None  # the dispatcher thread's connection, once open
        self._alarm = False  # a connection.blocked seen and not yet lifted
        self._busy_since: float | None = None

    # -- request threads -------------------------------------------------------------

    def wake(self, job_id: str, stage: str) -> None:
        """Publish the stage's wake-up for the job and wait for the broker's confirm.

        DispatchDelayed if it is not confirmed within the deadline or the broker refused
        it; the wake-up then stays queued here and is published when the broker is back.
        """
        request = _Request("publish", job_id, stage, since=self.clock())
        if not self._submit(request):
            raise DispatchDelayed(f"{MAX_WAITING} wake-ups already wait for the job queue")
        if not request.done.wait(self.deadline):
            raise DispatchDelayed(f"the job queue did not confirm within {self.deadline:g} s")
        if request.error:
            raise DispatchDelayed(request.error)

    def check(self) -> None:
        """Readiness: BrokerUnavailable unless a publish would work now."""
        with self._lock:
            busy_since, alarm = self._busy_since, self._alarm
        if busy_since is not None and self.clock() - busy_since > self.deadline:
            waited = self.clock() - busy_since
            cause = BLOCKED if alarm else "blocked by a resource alarm, or unreachable"
            raise BrokerUnavailable(f"RabbitMQ has not answered for {waited:.0f} s ({cause})")
        request = _Request("check", since=self.clock())
        if not self._submit(request):
            raise BrokerUnavailable(f"{MAX_WAITING} wake-ups wait for the job queue")
        if not request.done.wait(self.deadline):
            raise BrokerUnavailable(f"RabbitMQ did not answer within {self.deadline:g} s")
        if request.error:
            raise BrokerUnavailable(request.error)

    def _submit(self, request: _Request) -> bool:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="capy-dispatcher", daemon=True)
                self._thread.start()
        try:
            self._inbox.put_nowait(request)
        except queue.Full:
            return False
        return True

    # -- the dispatcher thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                request = self._inbox.get(timeout=TICK_SECONDS)
            except queue.Empty:
                request = None
            # The thread must outlive anything pika raises (AMQPError, but also OSError,
            # ValueError or AssertionError from a socket closed under it): it drops the
            # connection and carries on.
            try:
                if request is not None:
                    self._handle(request)
                self._retry_due()
                self._service()
            except Exception:
                log.exception("the dispatcher dropped its broker connection after an unexpected error")
                self._reset()

    def _handle(self, request: _Request) -> None:
        if request.kind == "check":
            # Twice: a connection that died unnoticed (a broker restart) fails the first
            # round trip; the check answers for a fresh one, as the next publish would.
            for _ in range(2):
                try:
                    self._check_now()
                    request.error = None
                    break
                except BrokerUnavailable as err:
                    request.error = err.message
                    break
                except Exception as err:
                    request.error = _describe(err)
                    self._reset()
            request.done.set()
            return
        self._attempt(request)

    def _check_now(self) -> None:
        with self._busy():
            self._open()  # also delivers a pending connection.blocked
            # Blocked, and a wake-up still waits: a publish would block too. (A notice with
            # nothing waiting is cleared by the round trip below: the next publish tells.)
            if self._alarm and self._retries:
                raise BrokerUnavailable(BLOCKED)
            # A publish, confirmed: RabbitMQ blocks a connection only when it publishes
            # (a resource alarm lets every other command through), so only a publish
            # tells whether the next wake-up would go out. Unroutable and not mandatory:
            # the broker confirms and drops it.
            self.broker.channel.basic_publish(exchange="", routing_key=READINESS_ROUTING_KEY, body=b"")
        with self._lock:
            self._alarm = False

    def _attempt(self, request: _Request) -> None:
        try:
            with self._busy():
                self._open()
                self._publish(request)
        except Exception as err:
            self._reset()
            if isinstance(err, pika.exceptions.ConnectionBlockedTimeout):
                with self._lock:
                    self._alarm = True
            request.error = _describe(err)
            request.attempts += 1
            request.done.set()
            self._schedule_retry(request)
            return
        with self._lock:
            self._alarm = False
        if request.attempts:
            waited = self.clock() - request.since
            log.info(
                "dispatched job %s (%s) after %.0f s: the job queue is back",
                request.job_id,
                request.stage,
                waited,
            )
        request.error = None
        request.done.set()

    def _schedule_retry(self, request: _Request) -> None:
        now = self.clock()
        if now - request.since > self.retry_for or len(self._retries) >= MAX_WAITING:
            log.warning(
                "job %s (%s) is still not dispatched (%s); capy-imports sweep wakes it",
                request.job_id,
                request.stage,
                request.error,
            )
            return
        log.warning(
            "could not dispatch job %s (%s): %s; retrying", request.job_id, request.stage, request.error
        )
        request.due = now + min(MAX_BACKOFF_SECONDS, 2 ** (request.attempts - 1))
        self._retries.append(request)

    def _retry_due(self) -> None:
        now = self.clock()
        for request in [r for r in self._retries if r.due <= now]:
            self._retries.remove(request)
            self._attempt(request)

    def _publish(self, request: _Request) -> None:
        """One attempt, as Dramatiq's `enqueue` publishes (a persistent message, mandatory
        routing, a publisher confirm), without its reconnect-and-retry loop: retrying at
        once on a connection RabbitMQ blocks only blocks again and leaves copies behind."""
        message = self.actors[request.stage].message_with_options(args=(request.job_id,))
        self.broker.declare_queue(message.queue_name, ensure=True)
        self.broker.emit_before("enqueue", message, None)
        try:
            self.broker.channel.basic_publish(
                exchange="",
                routing_key=message.queue_name,
                body=message.encode(),
                properties=pika.BasicProperties(delivery_mode=2),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            # The queue was deleted under us: declare it again on the next attempt.
            self.broker.queues_pending.add(message.queue_name)
            raise
        self.broker.emit_after("enqueue", message, None)

    def _open(self) -> None:
        """A live connection and channel: the one we hold if it still answers, else a new one."""
        if self._connection is not None:
            try:
                self._connection.process_data_events(0)
            except Exception:
                self._reset()
        connection = self.broker.connection  # Dramatiq's, for this thread: opened if missing
        if connection is not self._connection:
            connection.add_on_connection_blocked_callback(self._on_blocked)
            connection.add_on_connection_unblocked_callback(self._on_unblocked)
            self._connection = connection
        _ = self.broker.channel  # opens the channel, in confirm mode

    def _service(self) -> None:
        """Heartbeats and blocked notices while idle; a lost connection is dropped (the
        next publish or check opens a new one)."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(0)
        except Exception as err:
            log.info("the broker connection was lost (%s); the next publish reconnects", _describe(err))
            self._reset()

    def _reset(self) -> None:
        if self._connection is None:
            return
        self._connection = None
        try:
            del self.broker.connection  # this thread's channel and connection, closed
        except Exception:
            log.debug("closing a broken broker connection failed", exc_info=True)

    def _on_blocked(self, connection: Any, method: Any) -> None:
        log.warning("%s; wake-ups wait in the web process until it lifts", BLOCKED)
        with self._lock:
            self._alarm = True

    def _on_unblocked(self, connection: Any, method: Any) -> None:
        log.info("RabbitMQ stopped blocking publishers")
        with self._lock:
            self._alarm = False

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Marks the thread as inside a broker call, so that a readiness check finding it
        stuck there answers at once instead of queueing behind it."""
        with self._lock:
            self._busy_since = self.clock()
        try:
            yield
        finally:
            with self._lock:
                self._busy_since = None


def _describe(err: BaseException) -> str:
    """What went wrong, for a log line or a readiness answer; never the broker URL."""
    if isinstance(err, BrokerUnavailable):
        return err.message
    if isinstance(err, pika.exceptions.ConnectionBlockedTimeout):
        return f"{BLOCKED}, for longer than the blocked-connection timeout"
    if isinstance(err, (pika.exceptions.AMQPConnectionError, dramatiq.errors.BrokerConnectionError, OSError)):
        return f"the broker could not be reached ({type(err).__name__})"
    return f"the broker failed ({type(err).__name__})"
