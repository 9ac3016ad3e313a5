"""Dead-lettered stage messages: `capy-imports dlq list` and `dlq replay`.

Dramatiq's RabbitMQ broker declares every queue with a dead-letter queue,
`<queue>.XQ`: a message it gives up on (retries exhausted, an error it does not retry,
a time limit) is rejected and RabbitMQ moves it there, with an `x-death` header saying
when and from where; the body keeps the options Dramatiq's Retries middleware set on
its last retry (`retries`, `traceback`). Messages wait there for
`dramatiq_dead_message_ttl` (7 days by default).

Reading never consumes: every message is fetched unacknowledged and, unless it is
replayed, handed back (`basic_nack(requeue=True)`), which RabbitMQ returns to its
original position. A replay first resets the job's attempts (a guarded update, only
for an active job at that stage that nobody holds), then publishes the message to its
stage queue with Dramatiq's retry options removed, and only then acknowledges the dead
copy.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from pipeline import audit, jobs
from pipeline.db import database
from pipeline.errors import Unavailable
from pipeline.models import ACTIVE_STATES, STAGE_ORDER, Job, JobEvent, Project, utcnow

log = logging.getLogger(__name__)

IMPORT_REPLAYED = "project.import_replayed"
IMPORT_DEAD_LETTER_DROPPED = "project.import_dead_letter_dropped"
# Options Dramatiq's Retries middleware and delayed sends put on a message.
RETRY_OPTIONS = ("retries", "traceback", "requeue_timestamp", "eta", "max_retries")


@dataclass
class DeadLetter:
    queue: str
    stage: str
    job_id: str | None
    actor_name: str | None
    message_id: str | None
    retries: int | None
    failure: str
    dead_since: dt.datetime | None
    body: dict[str, Any]
    delivery_tag: int = field(repr=False)

    def age_seconds(self, now: dt.datetime) -> int | None:
        return None if self.dead_since is None else max(0, int((now - self.dead_since).total_seconds()))

    def summary(self, now: dt.datetime) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "stage": self.stage,
            "job_id": self.job_id,
            "message_id": self.message_id,
            "retries": self.retries,
            "failure": self.failure,
            "dead_since": self.dead_since.isoformat().replace("+00:00", "Z") if self.dead_since else None,
            "age_seconds": self.age_seconds(now),
        }


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JOB_ID = re.compile(r"^job_[0-9a-z]{1,64}$")


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes among them) shown as `\\xNN`:
    a dead letter's contents are anybody's, and operators read them in a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _failure(options: dict[str, Any], headers: dict[str, Any]) -> str:
    """The last line of the traceback Dramatiq kept, else why RabbitMQ dead-lettered it."""
    lines = [line.strip() for line in str(options.get("traceback") or "").splitlines() if line.strip()]
    if lines:
        return printable(lines[-1][:500])
    deaths = headers.get("x-death") or []
    if deaths:
        return f"{deaths[0].get('reason', 'rejected')} without a recorded error (no retry was attempted)"
    return "no failure was recorded"


def _dead_since(body: dict[str, Any], headers: dict[str, Any]) -> dt.datetime | None:
    deaths = headers.get("x-death") or []
    at = deaths[0].get("time") if deaths else None
    if isinstance(at, dt.datetime):
        return at if at.tzinfo else at.replace(tzinfo=dt.UTC)
    stamp = body.get("message_timestamp")
    return dt.datetime.fromtimestamp(stamp / 1000, dt.UTC) if isinstance(stamp, int | float) else None


def _decode(queue: str, stage: str, tag: int, properties: Any, raw: bytes) -> DeadLetter:
    headers = dict(properties.headers or {}) if properties is not None else {}
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        body = {}
    found = body.get("options")
    options: dict[str, Any] = found if isinstance(found, dict) else {}
    args = body.get("args") if isinstance(body.get("args"), list) else []
    job_id = args[0] if args and isinstance(args[0], str) else None
    if job_id is not None and not _JOB_ID.match(job_id):
        job_id = None
    retries = options.get("retries")
    message_id = body.get("message_id")
    actor_name = body.get("actor_name")
    return DeadLetter(
        queue=queue,
        stage=stage,
        job_id=job_id,
        actor_name=printable(actor_name) if isinstance(actor_name, str) else None,
        message_id=printable(message_id) if isinstance(message_id, str) else None,
        retries=retries if isinstance(retries, int) else None,
        failure=_failure(options, headers) if body else "the message is not a Dramatiq message (undecodable)",
        dead_since=_dead_since(body, headers),
        body=body,
        delivery_tag=tag,
    )


@dataclass
class Decision:
    letter: DeadLetter
    action: str  # "replayed", "would replay", "skipped", "dropped", "would drop"
    reason: str

    def as_dict(self, now: dt.datetime) -> dict[str, Any]:
        return {**self.letter.summary(now), "action": self.action, "reason": self.reason}


class DeadLetters:
    """The dead-letter queues of one deployment's stage queues (`<prefix>.<stage>.XQ`)."""

    def __init__(self, broker_url: str, prefix: str, *, lease: dt.timedelta) -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.lease = lease

    def stage_queue(self, stage: str) -> str:
        return f"{self.prefix}.{stage}"

    def dead_letter_queue(self, stage: str) -> str:
        return f"{self.stage_queue(stage)}.XQ"

    @contextmanager
    def _channel(self) -> Iterator[BlockingChannel]:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        except (pika.exceptions.AMQPError, OSError) as err:
            raise Unavailable(
                f"cannot reach RabbitMQ ({type(err).__name__}); check CAPY_BROKER_URL and that RabbitMQ is running"
            ) from err
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            yield channel
        finally:
            if connection.is_open:
                connection.close()  # anything still unacknowledged goes back to its queue

    def read(self) -> list[DeadLetter]:
        """What is in the dead-letter queues; everything stays there."""
        with self._channel() as channel:
            letters = list(self._each(channel))
            if letters:
                channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            return letters

    def _each(self, channel: BlockingChannel) -> Iterator[DeadLetter]:
        """Dead letters of every stage queue that exists (a queue is declared by the first
        worker or API process that uses it)."""
        for stage in (s.value for s in STAGE_ORDER):
            queue = self.dead_letter_queue(stage)
            if not self._exists(channel, queue):
                continue
            count = channel.queue_declare(queue, passive=True).method.message_count
            for _ in range(count):
                method, properties, raw = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                yield _decode(queue, stage, method.delivery_tag, properties, raw)

    @staticmethod
    def _exists(channel: BlockingChannel, queue: str) -> bool:
        """A passive declare of a missing queue closes its channel: ask on one of its own."""
        probe = channel.connection.channel()
        try:
            probe.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as err:
            if err.reply_code == 404:
                return False
            raise
        probe.close()
        return True

    def replay(
        self, actor: str, *, job_id: str | None, dry_run: bool, drop_ended: bool = False
    ) -> list[Decision]:
        """Put dead letters (all, or one job's) back on their stage queue where the job
        allows it; say for each what was done and why. With `drop_ended`, messages of
        jobs that ended or are unknown, which no replay can ever be right for, are
        removed from the dead-letter queue."""
        now = utcnow()
        decisions: list[Decision] = []
        with self._channel() as channel:
            letters = list(self._each(channel))
            for letter in letters:
                if job_id is not None and letter.job_id != job_id:
                    continue
                refusal, ended = self._refusal(letter, now)
                if refusal is not None and ended and drop_ended:
                    if not dry_run:
                        channel.basic_ack(letter.delivery_tag)
                        self._record_drop(letter, actor, refusal)
                    decisions.append(Decision(letter, "would drop" if dry_run else "dropped", refusal))
                    continue
                if refusal is not None:
                    decisions.append(Decision(letter, "skipped", refusal))
                    continue
                if dry_run:
                    decisions.append(
                        Decision(
                            letter, "would replay", "the job is active at this stage and nobody holds it"
                        )
                    )
                    continue
                if not self._reset_attempts(letter, actor, now):
                    decisions.append(
                        Decision(letter, "skipped", "the job changed while it was replayed; run this again")
                    )
                    continue
                self._publish(channel, letter)
                channel.basic_ack(letter.delivery_tag)
                decisions.append(
                    Decision(
                        letter, "replayed", f"put back on {self.stage_queue(letter.stage)} with retries reset"
                    )
                )
            if len(letters) > sum(d.action in ("replayed", "dropped") for d in decisions):
                channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
        return decisions

    def _refusal(self, letter: DeadLetter, now: dt.datetime) -> tuple[str | None, bool]:
        """Why this message must not be replayed (None if it may be), and whether its
        job ended or is unknown (then it never may)."""
        if letter.job_id is None:
            return "the message names no job", True
        expected = f"{self.prefix}_{letter.stage}"
        if letter.actor_name != expected:
            return (
                f"foreign: the message is for actor {letter.actor_name!r}, not this deployment's {expected}",
                True,
            )
        job = Job.get_or_none(Job.id == letter.job_id)
        if job is None:
            return "job unknown: no such job in this deployment's control database", True
        if job.state not in ACTIVE_STATES:
            hint = f"; to run it again: capy-imports jobs retry {job.id}" if job.state != "completed" else ""
            return f"job {job.state}{hint}", True
        if job.stage != letter.stage:
            return f"stale: the job has moved on to its {job.stage} stage", False
        if job.claimed_by and job.heartbeat_at is not None and job.heartbeat_at >= now - self.lease:
            return f"the job is running this stage now (held by {job.claimed_by})", False
        return None, False

    def _reset_attempts(self, letter: DeadLetter, actor: str, now: dt.datetime) -> bool:
        if letter.job_id is None:  # refused before (_refusal)
            return False
        with database.atomic():
            job = jobs.transition(
                letter.job_id,
                actor,
                f"dead-lettered {letter.stage} message {letter.message_id} replayed by {actor}; "
                f"attempts reset (it had failed with: {letter.failure})",
                where=Job.state.in_(ACTIVE_STATES)
                & (Job.stage == letter.stage)
                & (
                    Job.claimed_by.is_null()
                    | Job.heartbeat_at.is_null()
                    | (Job.heartbeat_at < now - self.lease)
                ),
                attempts=0,
                claimed_by=None,
                heartbeat_at=None,
                updated_at=now,
            )
            if job is None:
                return False
            audit.record(
                Project.get_by_id(job.project_id),
                IMPORT_REPLAYED,
                actor,
                target_id=job.id,
                details={"stage": letter.stage, "message_id": letter.message_id, "failure": letter.failure},
            )
            return True

    def _record_drop(self, letter: DeadLetter, actor: str, why: str) -> None:
        """A dropped message of a known job is an event of that job (and an audit event)."""
        job = Job.get_or_none(Job.id == letter.job_id) if letter.job_id else None
        if job is None:
            log.info("dropped dead-lettered %s message %s: %s", letter.stage, letter.message_id, why)
            return
        with database.atomic():
            JobEvent.create(
                job=job.id,
                actor=actor,
                reason=f"dead-lettered {letter.stage} message {letter.message_id} dropped by {actor}: {why}",
                from_state=job.state,
                to_state=job.state,
                from_stage=job.stage,
                to_stage=job.stage,
            )
            audit.record(
                Project.get_by_id(job.project_id),
                IMPORT_DEAD_LETTER_DROPPED,
                actor,
                target_id=job.id,
                details={"stage": letter.stage, "message_id": letter.message_id, "reason": why},
            )

    def _publish(self, channel: BlockingChannel, letter: DeadLetter) -> None:
        options = {k: v for k, v in (letter.body.get("options") or {}).items() if k not in RETRY_OPTIONS}
        body = {**letter.body, "queue_name": self.stage_queue(letter.stage), "options": options}
        # mandatory + publisher confirms: an unroutable message raises instead of vanishing.
        channel.basic_publish(
            exchange="",
            routing_key=self.stage_queue(letter.stage),
            body=json.dumps(body, separators=(",", ":")).encode(),
            properties=pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )
