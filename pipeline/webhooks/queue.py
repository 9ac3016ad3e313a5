"""The webhook queue: one Dramatiq actor on `<prefix>.webhooks` runs delivery attempts,
and the relay wakes deliveries whose message was lost.

Messages carry `(delivery_id, attempt)`; the delivery table is the truth (delivery.py).
The actor does not use Dramatiq's retries for the backoff: the schedule is the
delivery's own (recorded, listable, injectable), and each next attempt is a new
delayed message. RabbitMQ holds a delayed message unacknowledged in a worker until it
is due, and takes it back past its consumer_timeout (30 min by default), so no message
waits longer than MAX_HOP_SECONDS: a longer wait travels as several hops. Dramatiq's
retries are kept only for the control database being away (nothing could be recorded);
a message that still dies is covered by the relay, which `capy-imports sweep` runs.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import dramatiq
import pika.exceptions

from pipeline.config import Settings
from pipeline.db import CONNECTION_ERRORS, ControlDatabaseUnavailable, database
from pipeline.models import WebhookDelivery, utcnow
from pipeline.queue import WEBHOOKS_QUEUE
from pipeline.webhooks.delivery import MAX_HOP_SECONDS, PENDING, Deliverer
from stages.errors import TransientError

log = logging.getLogger(__name__)

# A due delivery this long without an attempt lost its message (or never had one: it
# was recorded by a process that sends none, such as the web's cancel).
RELAY_AFTER = dt.timedelta(seconds=30)
# An attempt is bounded by the transport's deadline; this leaves room for the database.
ACTOR_TIME_LIMIT_MS = 120_000


class WebhookQueue:
    """Declares the delivery actor on `broker` and sends attempts to it. The worker sets
    `deliverer`; other processes (the CLI's sweep) only send."""

    def __init__(
        self, broker: dramatiq.Broker, settings: Settings, deliverer: Deliverer | None = None
    ) -> None:
        self.deliverer = deliverer
        self.actor = dramatiq.actor(
            broker=broker,
            actor_name=f"{settings.queue_prefix}_webhook_delivery",
            queue_name=f"{settings.queue_prefix}.{WEBHOOKS_QUEUE}",
            max_retries=10,
            min_backoff=5_000,
            max_backoff=300_000,
            retry_when=lambda retries, exc: isinstance(exc, TransientError) and retries < 10,
            time_limit=ACTOR_TIME_LIMIT_MS,
        )(self._run)

    @property
    def queue_name(self) -> str:
        return self.actor.queue_name

    def _run(self, delivery_id: str, attempt: int) -> None:
        if self.deliverer is None:
            raise RuntimeError("this process only sends webhook messages")
        try:
            self.deliverer.deliver(delivery_id, attempt)
        except CONNECTION_ERRORS as err:
            database.close()  # the next statement reconnects
            log.warning("webhook delivery %s: the control database is unavailable: %s", delivery_id, err)
            raise ControlDatabaseUnavailable(
                "the control database was unavailable for a webhook delivery"
            ) from None

    def send(self, delivery_id: str, attempt: int, delay_seconds: float = 0) -> None:
        """Queue attempt `attempt` of the delivery, to run no sooner than `delay_seconds`
        from now (at most MAX_HOP_SECONDS); TransientError if the broker is down."""
        delay_ms = int(min(max(delay_seconds, 0), MAX_HOP_SECONDS) * 1000)
        try:
            self.actor.send_with_options(args=(delivery_id, attempt), delay=delay_ms or None)
        except (dramatiq.errors.BrokerConnectionError, pika.exceptions.AMQPError, OSError) as err:
            raise TransientError("could not queue a webhook delivery: the broker is unavailable") from err

    def send_first(self, deliveries: list[str]) -> None:
        """The first attempts of newly recorded deliveries (events.install's notifier)."""
        for delivery_id in deliveries:
            self.send(delivery_id, 1)


def relay(
    send: Callable[[str, int], None], *, now: dt.datetime | None = None, limit: int = 500
) -> list[dict[str, object]]:
    """Queue the next attempt of every pending delivery that is overdue by RELAY_AFTER and
    that no attempt holds; what was sent. Each is touched (`updated_at`), so a delivery
    whose worker is still away is sent once per RELAY_AFTER, not at every round; a
    duplicate message does nothing (delivery.Deliverer)."""
    now = now or utcnow()
    due = (
        WebhookDelivery.select()
        .where(
            (WebhookDelivery.state == PENDING)
            & (WebhookDelivery.next_attempt_at <= now - RELAY_AFTER)
            & (WebhookDelivery.updated_at <= now - RELAY_AFTER)
            & (WebhookDelivery.locked_until.is_null() | (WebhookDelivery.locked_until < now))
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    sent: list[dict[str, object]] = []
    for delivery in due:
        send(delivery.id, delivery.attempts + 1)
        WebhookDelivery.update(updated_at=now).where(
            (WebhookDelivery.id == delivery.id) & (WebhookDelivery.updated_at == delivery.updated_at)
        ).execute()
        sent.append({"delivery": delivery.id, "attempt": delivery.attempts + 1})
    return sent
