"""Which job state changes are webhook events, recorded with the change (the outbox).

`record(before, job)` is called by `pipeline.jobs.transition()` inside the transaction
that changes the job: the events and one delivery per endpoint of the organization
commit with the state change or not at all, so no event is lost and none tells of a
change that was rolled back. Messages are only wake-ups: after the commit the process
that made the change sends the first attempts (`notify`, when its edge installed a
notifier: the worker does), and `queue.relay` (run by `capy-imports sweep`, i.e. the
clock) sends whatever is due and was never sent.

Events, from an active state (pending, running) to an end:
- `job.completed`: any job, whatever its type, reached `completed`;
- `import.completed`: a `project.import` job reached `completed`, which it does only
  once its finalize stage has swapped the preview in as the project's database;
- `job.failed`: a job ended without completing: `failed`, or `cancelled` (its
  `data.state` says which; a consumer waiting for the end of a job hears of every end).
`data` is the job as the API shows it (pipeline.serialize.job_json: nothing secret).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.db import database
from pipeline.ids import new_id
from pipeline.models import ACTIVE_STATES, Job, State, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow
from pipeline.serialize import job_json, timestamp
from pipeline.webhooks.signing import envelope

log = logging.getLogger(__name__)

IMPORT_JOB_TYPE = "project.import"

Notifier = Callable[[list[str]], None]
_notifier: Notifier | None = None


def event_types(before: Job, job: Job) -> list[str]:
    """The events a change from `before` to `job` makes, in the order they are recorded."""
    if before.state not in ACTIVE_STATES or job.state in ACTIVE_STATES:
        return []
    if job.state == State.COMPLETED.value:
        return ["job.completed"] + (["import.completed"] if job.type == IMPORT_JOB_TYPE else [])
    if job.state in (State.FAILED.value, State.CANCELLED.value):
        return ["job.failed"]
    return []


def record(before: Job, job: Job) -> list[str]:
    """Record the events of this change and their deliveries, in the caller's
    transaction; the new deliveries' ids (none when the organization has no endpoint)."""
    types = event_types(before, job)
    if not types:
        return []
    endpoints = list(
        WebhookEndpoint.select(WebhookEndpoint.id).where(
            (WebhookEndpoint.organization == job.organization_id) & WebhookEndpoint.removed_at.is_null()
        )
    )
    if not endpoints:
        return []
    now = utcnow()
    data = job_json(job)
    deliveries: list[str] = []
    for event_type in types:
        event_id = new_id("evt")
        WebhookEvent.create(
            id=event_id,
            organization=job.organization_id,
            type=event_type,
            job=job.id,
            payload=envelope(event_id, event_type, timestamp(now) or "", data).decode(),
            created_at=now,
        )
        for endpoint in endpoints:
            delivery_id = new_id("whd")
            WebhookDelivery.create(
                id=delivery_id,
                event=event_id,
                endpoint=endpoint.id,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            deliveries.append(delivery_id)
    return deliveries


def install(notifier: Notifier | None) -> None:
    """Set (or clear, with None) what sends the first attempts of new deliveries in this
    process; called once, at the edge (the worker)."""
    global _notifier
    _notifier = notifier


def notify(deliveries: list[str]) -> None:
    """After the change committed: send the first attempts, if this process can. Inside
    a caller's still-open transaction nothing is sent (the rows are not visible yet);
    the relay sends them once they are. Never raises: the rows are the truth."""
    if not deliveries or _notifier is None:
        return
    if database.in_transaction():
        log.info(
            "webhook deliveries %s wait for the relay (recorded inside a larger transaction)",
            ", ".join(deliveries),
        )
        return
    try:
        _notifier(deliveries)
    except Exception as err:  # the broker is away: the relay sends them later
        log.warning(
            "could not queue webhook deliveries %s (%s); the relay sends them", ", ".join(deliveries), err
        )
