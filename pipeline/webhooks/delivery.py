"""One attempt of a webhook delivery, recorded, and the backoff between attempts.

A delivery makes at most MAX_ATTEMPTS attempts. Each message names the attempt it is
for, and an attempt starts only through a guarded update (`… WHERE state = 'pending'
AND attempts = n - 1 AND not locked`), so a duplicate or stale message does nothing and
no two attempts of one delivery run at once. Every attempt is recorded (status code or
error, duration, time) with the delivery's new state in one transaction; then, unless
it was delivered or that was the last attempt, the next one is scheduled after
`backoff(n)` seconds. A message that comes before its attempt is due (a long backoff
travels as several hops of at most MAX_HOP_SECONDS) sends itself on again.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.config import WEBHOOK_RETRY_SECONDS
from pipeline.db import database
from pipeline.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow
from pipeline.sealing import Sealer
from pipeline.webhooks import signing, transport
from pipeline.webhooks.endpoints import Resolver, Target, check_address
from stages.connections.addresses import resolve
from stages.errors import CapyError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
# Seconds to wait after failed attempt n (1-based) before attempt n + 1
# (CAPY_WEBHOOK_RETRY_SECONDS): about 3 h 43 min from the first attempt to the eighth.
DEFAULT_BACKOFF_SECONDS = WEBHOOK_RETRY_SECONDS
# The longest a message waits in the broker before it is due: RabbitMQ takes back a
# message a worker holds unacknowledged past its consumer_timeout (30 min by default),
# and a delayed message is held so until it is due (see queue.py).
MAX_HOP_SECONDS = 600
# How long an attempt holds its delivery: above the transport's whole deadline.
LOCK = dt.timedelta(seconds=2 * transport.DEADLINE_SECONDS)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

Backoff = Callable[[int], float]
# Send attempt `n` of a delivery after `delay` seconds (queue.WebhookQueue.send).
Send = Callable[[str, int, float], None]
Post = Callable[[Target, bytes, dict[str, str]], transport.Answer]


def backoff_schedule(seconds: Sequence[float] = DEFAULT_BACKOFF_SECONDS) -> Backoff:
    """The wait after failed attempt n: `seconds[n - 1]`, the last entry past the end."""
    if not seconds:
        raise ValueError("a backoff schedule needs at least one delay")
    steps = tuple(float(s) for s in seconds)

    def backoff(attempt: int) -> float:
        return steps[min(max(attempt, 1), len(steps)) - 1]

    return backoff


@dataclass(frozen=True)
class Outcome:
    """What a message did: made attempt `attempt` (delivered, retry, failed), sent itself
    on (rescheduled), or nothing (skipped), and why."""

    action: str  # "delivered", "retry", "failed", "rescheduled", "skipped"
    detail: str = ""
    attempt: int | None = None


class Deliverer:
    """Runs delivery attempts. Collaborators are passed in: `send` schedules the next
    message, `post` is the HTTP call, `resolver` the DNS lookup, `clock` the time."""

    def __init__(
        self,
        sealer: Sealer,
        send: Send,
        *,
        dev_mode: bool,
        allow_private: bool,
        backoff: Backoff | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        max_hop_seconds: float = MAX_HOP_SECONDS,
        post: Post = transport.post,
        resolver: Resolver = resolve,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.sealer = sealer
        self.send = send
        self.dev_mode = dev_mode
        self.allow_private = allow_private
        self.backoff = backoff or backoff_schedule()
        self.max_attempts = max_attempts
        self.max_hop_seconds = max_hop_seconds
        self.post = post
        self.resolver = resolver
        self.clock = clock

    def deliver(self, delivery_id: str, attempt: int) -> Outcome:
        """Make attempt `attempt` of the delivery if it is due and nobody made it yet."""
        now = self.clock()
        delivery = WebhookDelivery.get_or_none(WebhookDelivery.id == delivery_id)
        if delivery is None:
            return Outcome("skipped", "no such delivery")
        if delivery.state != PENDING or delivery.attempts != attempt - 1:
            return Outcome("skipped", f"the delivery is {delivery.state} after {delivery.attempts} attempts")
        if attempt > self.max_attempts:  # the last attempt's worker died before recording it
            self._give_up(
                delivery_id, attempt - 1, f"the last of {self.max_attempts} attempts was interrupted"
            )
            return Outcome("failed", "no attempts left")
        endpoint = WebhookEndpoint.get_by_id(delivery.endpoint_id)
        if endpoint.removed_at is not None:
            self._give_up(delivery_id, attempt - 1, "the endpoint was removed before the delivery was made")
            return Outcome("failed", "the endpoint was removed")
        wait = (delivery.next_attempt_at - now).total_seconds()
        if wait > 0:
            self.send(delivery_id, attempt, min(wait, self.max_hop_seconds))
            return Outcome("rescheduled", f"attempt {attempt} is due in {wait:.0f} s")
        if not self._lock(delivery_id, attempt, now):
            return Outcome("skipped", "another worker holds the delivery")
        event = WebhookEvent.get_by_id(delivery.event_id)
        answer = self._attempt(endpoint, event, delivery_id, now)
        return self._record(delivery_id, attempt, now, answer)

    def _lock(self, delivery_id: str, attempt: int, now: dt.datetime) -> bool:
        return bool(
            WebhookDelivery.update(attempts=attempt, locked_until=now + LOCK, updated_at=now)
            .where(
                (WebhookDelivery.id == delivery_id)
                & (WebhookDelivery.state == PENDING)
                & (WebhookDelivery.attempts == attempt - 1)
                & (WebhookDelivery.locked_until.is_null() | (WebhookDelivery.locked_until < now))
            )
            .execute()
        )

    def _attempt(
        self, endpoint: WebhookEndpoint, event: WebhookEvent, delivery_id: str, now: dt.datetime
    ) -> transport.Answer:
        started = time.monotonic()
        try:
            # Again at every attempt: what the name resolves to may have changed.
            target = check_address(
                endpoint.url, dev_mode=self.dev_mode, allow_private=self.allow_private, resolver=self.resolver
            )
            secret = self.sealer.open(endpoint.secret_encrypted)
        # A refused or unresolvable address (EndpointAddressNotAllowed), a secret no key opens.
        except CapyError as err:
            return transport.Answer(None, err.message, int((time.monotonic() - started) * 1000))
        body = event.payload.encode()
        stamp = int(now.timestamp())
        headers = signing.headers(secret, stamp, body, event_type=event.type, delivery_id=delivery_id)
        return self.post(target, body, headers)

    def _record(self, delivery_id: str, attempt: int, at: dt.datetime, answer: transport.Answer) -> Outcome:
        done = self.clock()
        last = attempt >= self.max_attempts
        if answer.ok:
            state, action, next_at = DELIVERED, "delivered", None
        elif last:
            state, action, next_at = FAILED, "failed", None
        else:
            delay = self.backoff(attempt)
            state, action, next_at = PENDING, "retry", done + dt.timedelta(seconds=delay)
        with database.atomic():
            WebhookAttempt.create(
                delivery=delivery_id,
                attempt=attempt,
                at=at,
                status_code=answer.status_code,
                error=answer.error,
                duration_ms=answer.duration_ms,
            )
            values = {
                "state": state,
                "locked_until": None,
                "last_status_code": answer.status_code,
                "last_error": answer.error,
                "updated_at": done,
            }
            if next_at is not None:
                values["next_attempt_at"] = next_at
            else:
                values["completed_at"] = done
            WebhookDelivery.update(**values).where(
                (WebhookDelivery.id == delivery_id) & (WebhookDelivery.attempts == attempt)
            ).execute()
        detail = f"HTTP {answer.status_code}" if answer.error is None else answer.error
        if action == "retry":
            log.info(
                "webhook delivery %s: attempt %d failed (%s); attempt %d follows",
                delivery_id,
                attempt,
                detail,
                attempt + 1,
            )
            try:
                self.send(delivery_id, attempt + 1, min(self.backoff(attempt), self.max_hop_seconds))
            except CapyError as err:  # the broker is away: the relay sends it when it is due
                log.warning(
                    "webhook delivery %s: could not queue attempt %d (%s)",
                    delivery_id,
                    attempt + 1,
                    err.message,
                )
        elif action == "failed":
            log.warning(
                "webhook delivery %s: gave up after %d attempts; last: %s", delivery_id, attempt, detail
            )
        else:
            log.info("webhook delivery %s: delivered at attempt %d (%s)", delivery_id, attempt, detail)
        return Outcome(action, detail, attempt)

    def _give_up(self, delivery_id: str, attempts: int, why: str) -> None:
        now = self.clock()
        WebhookDelivery.update(
            state=FAILED, last_error=why, completed_at=now, updated_at=now, locked_until=None
        ).where(
            (WebhookDelivery.id == delivery_id)
            & (WebhookDelivery.state == PENDING)
            & (WebhookDelivery.attempts == attempts)
        ).execute()
