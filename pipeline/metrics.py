"""The service's Prometheus metrics that processes count as things happen: HTTP
requests (the API), stage runs, failures, bytes and rows (the workers).

Several processes count them (gunicorn's workers, Dramatiq's worker processes), so
they use prometheus-client's multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set
in the environment the process starts with (the run commands set it; the library
reads it when first imported): each process writes its values to files there, and
the API's `/metrics` adds up every file (pipeline.scrape). Without it, each process
counts alone, which is only right for a single process (tests, a one-worker dev run).

What is true of the whole service at any moment (jobs by state, queue depths) is not
counted here but read at scrape time (pipeline.scrape).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from pipeline.steps.results import JobFacts

log = logging.getLogger(__name__)

P = ParamSpec("P")


def _never_fails(record: Callable[P, None]) -> Callable[P, None]:
    """A metric that cannot be written (a full disk under PROMETHEUS_MULTIPROC_DIR)
    is logged, never raised: counting must not fail an import or a request."""

    @functools.wraps(record)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            log.warning("could not record a metric (%s)", record.__name__, exc_info=True)

    return guarded


# Route templates, never raw paths: no IDs in labels.
HTTP_REQUESTS = Counter(
    "capy_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "capy_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

STAGE_DURATION = Histogram(
    "capy_stage_duration_seconds",
    "How long one run of a stage took, from its claim to its outcome, by stage and outcome.",
    ["stage", "outcome"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
STAGE_FAILURES = Counter(
    "capy_stage_failures_total",
    "Stage runs that failed, by stage and classification (permanent, transient, internal, "
    "control_database, time_limit).",
    ["stage", "classification"],
)
JOBS_FAILED = Counter(
    "capy_jobs_failed_total",
    "Jobs that ended failed, by the stage they failed at and their classification "
    "(the job's retry_classification: permanent or transient).",
    ["stage", "classification"],
)
COPIED_BYTES = Counter(
    "capy_copied_bytes_total",
    "Bytes of completed imports: the dump's size, or what a live copy moved; by source (live, upload).",
    ["source"],
)
COPIED_ROWS = Counter(
    "capy_copied_rows_total",
    "Rows of completed imports (the verified report's row count), by source (live, upload).",
    ["source"],
)

# How a stage run ended (`outcome` of STAGE_DURATION). Those in FAILED_OUTCOMES count
# as failures too, under the same name.
SUCCEEDED = "succeeded"
FAILED_OUTCOMES = ("permanent", "transient", "internal", "control_database", "time_limit")
OTHER_OUTCOMES = ("cancelled", "claim_lost", "handed_back", "interrupted")


class StageRun:
    """Times one claimed run of a stage; `end(outcome)` records it once."""

    def __init__(self, stage: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage = stage
        self.clock = clock
        self.started = clock()
        self.outcome: str | None = None

    def end(self, outcome: str) -> None:
        if self.outcome is not None:
            return
        if outcome != SUCCEEDED and outcome not in FAILED_OUTCOMES and outcome not in OTHER_OUTCOMES:
            raise ValueError(f"unknown stage outcome {outcome!r}")
        self.outcome = outcome
        self._record(outcome)

    @_never_fails
    def _record(self, outcome: str) -> None:
        STAGE_DURATION.labels(self.stage, outcome).observe(max(0.0, self.clock() - self.started))
        if outcome in FAILED_OUTCOMES:
            STAGE_FAILURES.labels(self.stage, outcome).inc()


@_never_fails
def job_failed(stage: str, classification: str) -> None:
    JOBS_FAILED.labels(stage, classification).inc()


@_never_fails
def import_completed(upload_key: str | None, facts: JobFacts) -> None:
    """Count a completed import's bytes and rows, from what its stages recorded."""
    source = "upload" if upload_key else "live"
    dump_bytes = facts.dump_bytes
    if isinstance(dump_bytes, int | float) and dump_bytes > 0:
        COPIED_BYTES.labels(source).inc(dump_bytes)
    rows = (facts.report or {}).get("row_count")
    if isinstance(rows, int | float) and rows > 0:
        COPIED_ROWS.labels(source).inc(rows)


# gunicorn accepts any upper-case token of 3 to 20 characters as a method, and Falcon
# answers it (400, 404, 405): as a label, each would be a series of its own, for ever.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"


@_never_fails
def http_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one answered request; a method outside HTTP_METHODS counts as `other`."""
    method = method if method in HTTP_METHODS else OTHER_METHOD
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_DURATION.labels(method, route).observe(max(0.0, seconds))
