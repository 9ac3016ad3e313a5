"""`capy-imports webhooks add|list|remove|deliveries|redeliver`: an organization's
endpoints, what was sent to them, and sending an event again. `register(sub, add)` hangs
the group on the CLI's parser."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from typing import Any, Protocol

from pipeline import accounts, services
from pipeline.config import Settings
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.ids import new_id
from pipeline.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow
from pipeline.serialize import timestamp
from pipeline.webhooks.delivery import PENDING
from pipeline.webhooks.endpoints import (
    add_endpoint,
    endpoint_json,
    get_endpoint,
    list_endpoints,
    remove_endpoint,
)
from pipeline.webhooks.queue import WebhookQueue
from stages.errors import TransientError


class _Out(Protocol):
    """What pipeline.cli.Output offers: `emit(obj, text)`."""

    def emit(self, obj: dict[str, Any], text: str) -> None: ...


def cmd_add(args: argparse.Namespace, settings: Settings, out: _Out) -> None:
    org = accounts.get_organization(args.org)
    created = add_endpoint(
        org,
        args.url,
        services.sealer(settings),
        dev_mode=settings.dev_mode,
        allow_private=settings.allow_private_sources,
        description=args.description or "",
    )
    endpoint = created.record
    out.emit(
        {**endpoint_json(endpoint), "secret": created.secret},
        f"added webhook endpoint {endpoint.id} for organization {org.id}: {endpoint.url}\n"
        "it receives job.completed, job.failed and import.completed; its signing secret is shown "
        f"only once:\n{created.secret}",
    )


def cmd_list(args: argparse.Namespace, settings: Settings, out: _Out) -> None:
    org = accounts.get_organization(args.org)
    rows = [endpoint_json(e) for e in list_endpoints(org, include_removed=args.all)]
    lines = [
        f"{e['id']}  {e['url']}  added {e['created_at']}"
        + (f"  removed {e['removed_at']}" if e["removed_at"] else "")
        + (f"  {e['description']}" if e["description"] else "")
        for e in rows
    ]
    out.emit(
        {"endpoints": rows}, "\n".join(lines) if lines else f"organization {org.id} has no webhook endpoints"
    )


def cmd_remove(args: argparse.Namespace, settings: Settings, out: _Out) -> None:
    endpoint, removed = remove_endpoint(args.endpoint)
    text = (
        f"removed webhook endpoint {endpoint.id} ({endpoint.url}); nothing more is sent to it"
        if removed
        else f"webhook endpoint {endpoint.id} was already removed at {timestamp(endpoint.removed_at)}; nothing to do"
    )
    out.emit({**endpoint_json(endpoint), "removed": removed}, text)


def delivery_json(
    delivery: WebhookDelivery, event: WebhookEvent, attempts: list[WebhookAttempt]
) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "endpoint_id": delivery.endpoint_id,
        "event_id": event.id,
        "event_type": event.type,
        "job_id": event.job_id,
        "state": delivery.state,
        "attempts": [
            {
                "attempt": a.attempt,
                "at": timestamp(a.at),
                "status_code": a.status_code,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }
            for a in attempts
        ],
        "next_attempt_at": timestamp(delivery.next_attempt_at) if delivery.state == "pending" else None,
        "created_at": timestamp(delivery.created_at),
        "completed_at": timestamp(delivery.completed_at),
    }


def deliveries(
    *, org_id: str | None = None, endpoint_id: str | None = None, job_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Deliveries, newest first, each with every attempt it made."""
    query = (
        WebhookDelivery.select(WebhookDelivery, WebhookEvent)
        .join(WebhookEvent)
        .switch(WebhookDelivery)
        .join(WebhookEndpoint)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(limit)
    )
    if org_id:
        query = query.where(WebhookEndpoint.organization == org_id)
    if endpoint_id:
        query = query.where(WebhookDelivery.endpoint == endpoint_id)
    if job_id:
        query = query.where(WebhookEvent.job == job_id)
    found = list(query)
    attempts: dict[str, list[WebhookAttempt]] = {d.id: [] for d in found}
    if found:
        for attempt in (
            WebhookAttempt.select()
            .where(WebhookAttempt.delivery.in_(list(attempts)))
            .order_by(WebhookAttempt.attempt)
        ):
            attempts[attempt.delivery_id].append(attempt)
    return [delivery_json(d, d.event, attempts[d.id]) for d in found]


def cmd_deliveries(args: argparse.Namespace, settings: Settings, out: _Out) -> None:
    if not (args.org or args.endpoint or args.job):
        raise InvalidRequest("say whose deliveries to list: --org ID, --endpoint ID or --job ID")
    if args.limit < 1 or args.limit > 1000:
        raise InvalidRequest("--limit must be between 1 and 1000")
    if args.org:
        accounts.get_organization(args.org)
    if args.endpoint:
        get_endpoint(args.endpoint)
    rows = deliveries(org_id=args.org, endpoint_id=args.endpoint, job_id=args.job, limit=args.limit)
    lines: list[str] = []
    for d in rows:
        lines.append(
            f"{d['id']}  {d['state']:<9}  {d['event_type']:<16}  job {d['job_id']}  to {d['endpoint_id']}"
            + (f"  next attempt {d['next_attempt_at']}" if d["next_attempt_at"] else "")
        )
        lines += [
            f"  attempt {a['attempt']}  {a['at']}  {a['duration_ms']} ms  "
            + (f"HTTP {a['status_code']}" if a["status_code"] is not None else "no answer")
            + (f"  {a['error']}" if a["error"] else "")
            for a in d["attempts"]
        ]
    out.emit({"deliveries": rows}, "\n".join(lines) if lines else "no webhook deliveries")


def redeliver(delivery_id: str, *, now: dt.datetime | None = None) -> WebhookDelivery:
    """A new delivery of the same event to the same endpoint, with its own attempts.
    NotFound for an unknown delivery; Conflict while it is still pending or when its
    endpoint was removed."""
    old = WebhookDelivery.get_or_none(WebhookDelivery.id == delivery_id)
    if old is None:
        raise NotFound(f"webhook delivery {delivery_id} does not exist")
    if old.state == PENDING:
        raise Conflict(
            f"webhook delivery {delivery_id} is still pending (attempt {old.attempts + 1} is next); wait for it"
        )
    if get_endpoint(old.endpoint_id).removed_at is not None:
        raise Conflict(f"the endpoint of webhook delivery {delivery_id} ({old.endpoint_id}) was removed")
    now = now or utcnow()
    return WebhookDelivery.create(
        id=new_id("whd"),
        event=old.event_id,
        endpoint=old.endpoint_id,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )


def cmd_redeliver(args: argparse.Namespace, settings: Settings, out: _Out) -> None:
    delivery = redeliver(args.delivery)
    broker = services.broker(settings)
    try:
        WebhookQueue(broker, settings).send(delivery.id, 1)
        how = "its first attempt is queued"
    except TransientError:
        how = "the broker is unavailable: `capy-imports sweep` (the clock) sends it once it is back"
    finally:
        broker.close()
    row = delivery_json(delivery, WebhookEvent.get_by_id(delivery.event_id), [])
    out.emit(
        {**row, "redelivery_of": args.delivery},
        f"new delivery {delivery.id} of event {row['event_id']} ({row['event_type']}) to {delivery.endpoint_id}; {how}",
    )


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the `webhooks` group to the CLI (`add(parent, name, func, help)` as cli.py's)."""
    group = sub.add_parser("webhooks", help="webhook endpoints and deliveries").add_subparsers(
        dest="sub", required=True
    )
    p = add(group, "add", cmd_add, "add an organization's webhook endpoint (its secret is printed once)")
    p.add_argument("--org", required=True)
    p.add_argument("--url", required=True, help="https:// URL (http:// too in development mode)")
    p.add_argument("--description")
    p = add(group, "list", cmd_list, "list an organization's webhook endpoints (never their secrets)")
    p.add_argument("--org", required=True)
    p.add_argument("--all", action="store_true", help="removed endpoints too")
    p = add(group, "remove", cmd_remove, "remove a webhook endpoint; nothing more is sent to it")
    p.add_argument("endpoint", metavar="ENDPOINT_ID")
    p = add(group, "deliveries", cmd_deliveries, "list webhook deliveries with every attempt, newest first")
    p.add_argument("--org")
    p.add_argument("--endpoint")
    p.add_argument("--job")
    p.add_argument("--limit", type=int, default=50)
    p = add(
        group, "redeliver", cmd_redeliver, "send a delivered or failed delivery's event to its endpoint again"
    )
    p.add_argument("delivery", metavar="DELIVERY_ID")
