"""What `GET /metrics` answers: the counters every process wrote (pipeline.metrics),
and what is true of the whole service now, read when scraped.

- `JobGauges`: jobs by state and stage, from the control database (one GROUP BY), so
  every web process answers the same, whichever worker moved the jobs.
- `QueueGauges`: messages waiting in each stage queue, its delay queue and its
  dead-letter queue, from RabbitMQ (passive declares on a connection of its own, with
  short timeouts).
- `ProcessFiles`: the multiprocess files under PROMETHEUS_MULTIPROC_DIR and its
  subdirectories (one per host or container that shares the directory: process IDs
  are only unique within one), added up.

A source that cannot be read leaves its metrics out and says so in
`capy_metrics_source_up{source}`: a scrape never fails because the database or the
broker is away.
"""

from __future__ import annotations

import glob
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

import peewee
import pika
import pika.exceptions
import psycopg2
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pipeline.config import ConfigError
from pipeline.db import database
from pipeline.models import STAGE_ORDER, Job, State

log = logging.getLogger(__name__)

# A scrape waits at most this long for RabbitMQ (connecting, each answer).
BROKER_TIMEOUT_SECONDS = 3
# ...and this long for the jobs' count, once connected (connecting: connect_timeout).
DATABASE_TIMEOUT_MS = 3000


def source_up(source: str, up: bool) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "capy_metrics_source_up",
        "Whether this scrape could read the source (database, broker, process_files); 0 leaves its metrics out.",
        labels=["source"],
    )
    family.add_metric([source], 1 if up else 0)
    return family


class JobGauges:
    """`capy_jobs{state, stage}`: every combination, 0 when no job is in it."""

    def __init__(self, count: Callable[[], Iterable[tuple[str, str, int]]] | None = None) -> None:
        self.count = count or count_jobs

    def collect(self) -> Iterator[Metric]:
        try:
            rows = list(self.count())
        except (peewee.PeeweeException, psycopg2.Error) as err:
            log.warning("metrics: could not count jobs: %s", type(err).__name__)
            yield source_up("database", False)
            return
        counts: dict[tuple[str, str], int] = {
            (state, stage): 0 for state in State for stage in (s.value for s in STAGE_ORDER)
        }
        for state, stage, n in rows:
            counts[(state, stage)] = counts.get((state, stage), 0) + n
        family = GaugeMetricFamily("capy_jobs", "Jobs by state and stage, now.", labels=["state", "stage"])
        for (state, stage), n in sorted(counts.items()):
            family.add_metric([str(state), str(stage)], n)
        yield family
        yield source_up("database", True)


def count_jobs() -> list[tuple[str, str, int]]:
    """(state, stage, count) of every job in the control database, within
    DATABASE_TIMEOUT_MS: a scrape does not wait for a lock on the jobs table (a migration's
    ALTER TABLE) nor for a slow server; the statement is cancelled and the gauges left out."""
    query = Job.select(Job.state, Job.stage, peewee.fn.COUNT(Job.id)).group_by(Job.state, Job.stage)
    with database.atomic():
        database.execute_sql(f"SET LOCAL statement_timeout = {DATABASE_TIMEOUT_MS}")
        # tuples() makes the rows tuples; to types-peewee they stay Job models.
        rows = cast("Iterable[tuple[str, str, int]]", query.tuples())
        return [(state, stage, n) for state, stage, n in rows]


class QueueGauges:
    """`capy_queue_messages{queue}` (each stage queue and its delay queue, `.DQ`) and
    `capy_dead_letter_messages{queue}` (`.XQ`); a queue not declared yet is left out."""

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        *,
        depth: Callable[[list[str]], dict[str, int]] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.queues = list(queues)
        self.depth = depth or self._declare

    def collect(self) -> Iterator[Metric]:
        names = [name for queue in self.queues for name in (queue, f"{queue}.DQ", f"{queue}.XQ")]
        try:
            depths = self.depth(names)
        except (pika.exceptions.AMQPError, OSError) as err:
            log.warning("metrics: could not read the queues: %s", type(err).__name__)
            yield source_up("broker", False)
            return
        waiting = GaugeMetricFamily(
            "capy_queue_messages",
            "Messages waiting in a stage queue or its delay queue (.DQ).",
            labels=["queue"],
        )
        dead = GaugeMetricFamily(
            "capy_dead_letter_messages",
            "Messages in a stage queue's dead-letter queue (.XQ).",
            labels=["queue"],
        )
        for name, count in sorted(depths.items()):
            (dead if name.endswith(".XQ") else waiting).add_metric([name], count)
        yield waiting
        yield dead
        yield source_up("broker", True)

    def _declare(self, names: list[str]) -> dict[str, int]:
        """Message counts by passive declare. A missing queue closes the channel it was
        asked on (404), so the next one is asked on a new channel."""
        params = pika.URLParameters(self.broker_url)
        params.socket_timeout = BROKER_TIMEOUT_SECONDS
        params.stack_timeout = BROKER_TIMEOUT_SECONDS + 2
        params.blocked_connection_timeout = BROKER_TIMEOUT_SECONDS
        params.connection_attempts = 1
        connection = pika.BlockingConnection(params)
        try:
            depths: dict[str, int] = {}
            channel = connection.channel()
            for name in names:
                try:
                    depths[name] = channel.queue_declare(name, passive=True).method.message_count
                except pika.exceptions.ChannelClosedByBroker as err:
                    if err.reply_code != 404:
                        raise
                    channel = connection.channel()
            return depths
        finally:
            if connection.is_open:
                connection.close()


# What reading a metric file that is cut short or not one raises (prometheus-client
# reads its length, its keys as UTF-8 and JSON, its name's parts).
_UNREADABLE = (OSError, ValueError, struct.error, IndexError)


class ProcessFiles:
    """The counters of every process that wrote to `path` or a subdirectory of it.

    A file that cannot be read (empty: its process died or the disk filled as it was
    created; unreadable; not a metric file) is left out and said so in
    `capy_metrics_source_up{source="process_files"}`: one bad file made every scrape fail."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self.path, "*.db")) + glob.glob(os.path.join(self.path, "*", "*.db"))
        try:
            merged = MultiProcessCollector.merge(files, accumulate=True)
            readable = True
        except _UNREADABLE:
            good = [f for f in files if _readable(f)]
            merged = MultiProcessCollector.merge(good, accumulate=True)
            readable = False
        yield from merged
        yield source_up("process_files", readable)


def _readable(path: str) -> bool:
    try:
        MultiProcessCollector.merge([path], accumulate=True)
    except _UNREADABLE as err:
        log.warning("metrics: left out %s, which cannot be read (%s)", path, type(err).__name__)
        return False
    return True


class _ThisProcess:
    """This process's own metrics (single-process mode)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def multiprocess_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR as prometheus-client read it, if it is a directory."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and os.path.isdir(path) else None


def check_multiprocess_dir() -> str | None:
    """At start-up: PROMETHEUS_MULTIPROC_DIR, if set, must be a directory, or every
    metric written would fail (ConfigError). None when unset (each process counts alone)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    if not os.path.isdir(path):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR is {path!r}, which is not a directory: create it (the run "
            "commands do, see README, Metrics) or unset it"
        )
    return path


class _OneFamilyPerName:
    """The families of `collectors`, those of one name merged into one: every source
    yields its `capy_metrics_source_up`, and the text format allows one HELP and TYPE
    line per name, its samples in one group (a parser such as promtool's refuses the
    whole scrape otherwise)."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for collector in self.collectors:
            for family in collector.collect():
                kept = families.setdefault(family.name, family)
                if kept is not family:  # each scrape's families are its own: extending is safe
                    kept.samples.extend(family.samples)
        return list(families.values())


def registry(gauges: Sequence[Collector] = (), *, process_dir: str | None = None) -> CollectorRegistry:
    """A registry for one scrape: the processes' counters (from `process_dir`'s files,
    else this process's own) and `gauges`, one family per metric name."""
    fresh = CollectorRegistry()
    fresh.register(_OneFamilyPerName([ProcessFiles(process_dir) if process_dir else _ThisProcess(), *gauges]))
    return fresh


def render(gauges: Sequence[Collector] = (), *, process_dir: str | None = None) -> bytes:
    """The text exposition format (version 0.0.4-compatible) of one scrape."""
    return generate_latest(registry(gauges, process_dir=process_dir))
