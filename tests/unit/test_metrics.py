"""Metrics: stage runs and failures counted, the scrape-time gauges, several processes'
files added up, and /metrics with its request IDs and token. No sockets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import falcon
import falcon.testing
import peewee
import pika.exceptions
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app import errors
from app.observability import MetricsResource, RequestObservation, request_id
from pipeline import metrics, scrape
from pipeline.steps.results import JobFacts


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_run_is_timed_once_and_failures_are_counted_by_classification():
    clock = Clock()
    count = value("capy_stage_duration_seconds_count", stage="restore", outcome="transient")
    slow = value("capy_stage_duration_seconds_bucket", stage="restore", outcome="transient", le="60.0")
    failures = value("capy_stage_failures_total", stage="restore", classification="transient")
    # The registry is the process's: imports run earlier in it (integration tests) counted too.
    quick = value("capy_stage_duration_seconds_bucket", stage="restore", outcome="transient", le="30.0")
    succeeded = value("capy_stage_duration_seconds_count", stage="restore", outcome="succeeded")
    run = metrics.StageRun("restore", clock)
    clock.now += 42
    run.end("transient")
    run.end("succeeded")  # a run has one outcome: the first
    assert value("capy_stage_duration_seconds_count", stage="restore", outcome="transient") == count + 1
    assert (
        value("capy_stage_duration_seconds_bucket", stage="restore", outcome="transient", le="60.0")
        == slow + 1
    )
    assert (
        value("capy_stage_duration_seconds_bucket", stage="restore", outcome="transient", le="30.0") == quick
    )
    assert value("capy_stage_failures_total", stage="restore", classification="transient") == failures + 1
    assert value("capy_stage_duration_seconds_count", stage="restore", outcome="succeeded") == succeeded


def test_a_success_or_a_cancel_is_not_a_failure():
    before = value("capy_stage_failures_total", stage="fetch", classification="cancelled")
    metrics.StageRun("fetch").end("cancelled")
    assert value("capy_stage_duration_seconds_count", stage="fetch", outcome="cancelled") >= 1
    assert value("capy_stage_failures_total", stage="fetch", classification="cancelled") == before == 0
    with pytest.raises(ValueError, match="unknown stage outcome"):
        metrics.StageRun("fetch").end("exploded")


def test_a_completed_import_counts_its_bytes_and_rows():
    rows, size = (
        value("capy_copied_rows_total", source="upload"),
        value("capy_copied_bytes_total", source="upload"),
    )
    metrics.import_completed("uploads/prj/x.dump", JobFacts(dump_bytes=2048, report={"row_count": 15607}))
    metrics.import_completed("uploads/prj/y.dump", JobFacts(report={}))  # nothing recorded: nothing counted
    assert value("capy_copied_rows_total", source="upload") == rows + 15607
    assert value("capy_copied_bytes_total", source="upload") == size + 2048


def test_a_metric_that_cannot_be_written_does_not_fail_the_caller(monkeypatch):
    def broken(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(metrics.JOBS_FAILED, "labels", broken)
    metrics.job_failed("restore", "permanent")  # logged, not raised


def test_jobs_by_state_and_stage_are_counted_when_scraped():
    gauges = scrape.JobGauges(lambda: [("running", "restore", 2), ("completed", "finalize", 7)])
    text = scrape.render([gauges], process_dir=None).decode()
    got = samples(text)
    assert got[("capy_jobs", (("stage", "restore"), ("state", "running")))] == 2
    assert got[("capy_jobs", (("stage", "finalize"), ("state", "completed")))] == 7
    # Every combination is there, 0 when empty: a dashboard sees a state empty out.
    assert got[("capy_jobs", (("stage", "preflight"), ("state", "failed")))] == 0
    assert len([key for key in got if key[0] == "capy_jobs"]) == 5 * 4
    assert got[("capy_metrics_source_up", (("source", "database"),))] == 1


def test_an_unreachable_database_or_broker_leaves_their_gauges_out():
    def no_database():
        raise peewee.OperationalError("connection refused")

    def no_broker(names):
        raise pika.exceptions.AMQPConnectionError("refused")

    text = scrape.render(
        [
            scrape.JobGauges(no_database),
            scrape.QueueGauges("amqp://x.invalid", ["capy.fetch"], depth=no_broker),
        ]
    ).decode()
    got = samples(text)
    assert got[("capy_metrics_source_up", (("source", "database"),))] == 0
    assert got[("capy_metrics_source_up", (("source", "broker"),))] == 0
    assert not any(
        name in ("capy_jobs", "capy_queue_messages", "capy_dead_letter_messages") for name, _ in got
    )


def test_queue_and_dead_letter_depths():
    asked = []

    def depth(names):
        asked.extend(names)
        return {"capy.fetch": 3, "capy.fetch.DQ": 1, "capy.fetch.XQ": 2}  # capy.restore not declared yet

    got = samples(
        scrape.render(
            [scrape.QueueGauges("amqp://x.invalid", ["capy.fetch", "capy.restore"], depth=depth)]
        ).decode()
    )
    assert asked == [
        "capy.fetch",
        "capy.fetch.DQ",
        "capy.fetch.XQ",
        "capy.restore",
        "capy.restore.DQ",
        "capy.restore.XQ",
    ]
    assert got[("capy_queue_messages", (("queue", "capy.fetch"),))] == 3
    assert got[("capy_queue_messages", (("queue", "capy.fetch.DQ"),))] == 1
    assert got[("capy_dead_letter_messages", (("queue", "capy.fetch.XQ"),))] == 2
    assert ("capy_queue_messages", (("queue", "capy.restore"),)) not in got


COUNT_IN_A_PROCESS = textwrap.dedent(
    """
    import sys
    from pipeline import metrics
    from pipeline.steps.results import JobFacts
    for _ in range(int(sys.argv[1])):
        metrics.StageRun("fetch").end("succeeded")
    metrics.import_completed(None, JobFacts(dump_bytes=100, report={"row_count": 10}))
    """
)


def test_the_counts_of_processes_in_several_directories_add_up(tmp_path: Path):
    """Processes of one host write to PROMETHEUS_MULTIPROC_DIR; another host (container)
    sharing the volume writes to a subdirectory; the scrape adds every file up."""
    for where, runs in ((tmp_path, 2), (tmp_path, 3), (tmp_path / "worker-b", 4)):
        where.mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, "-c", COUNT_IN_A_PROCESS, str(runs)],
            env={"PROMETHEUS_MULTIPROC_DIR": str(where), "PATH": "/usr/bin:/bin"},
            cwd=Path(__file__).resolve().parents[2],
            check=True,
        )
    got = samples(scrape.render([], process_dir=str(tmp_path)).decode())
    key = (("outcome", "succeeded"), ("stage", "fetch"))
    assert got[("capy_stage_duration_seconds_count", key)] == 9
    assert got[("capy_stage_duration_seconds_bucket", (("le", "+Inf"), *key))] == 9
    assert got[("capy_copied_bytes_total", (("source", "live"),))] == 300
    assert got[("capy_copied_rows_total", (("source", "live"),))] == 30


def test_a_metric_file_that_cannot_be_read_is_left_out_not_the_whole_scrape(tmp_path: Path):
    # A process killed (or a full disk) as it created its file leaves it empty: every
    # scrape raised on it (a 500) until someone deleted it by hand.
    subprocess.run(
        [sys.executable, "-c", COUNT_IN_A_PROCESS, "2"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    (tmp_path / "counter_999999.db").write_bytes(b"")
    (tmp_path / "worker-b").mkdir()
    (tmp_path / "worker-b" / "histogram_999998.db").write_bytes(b"\xff" * 64)
    got = samples(scrape.render([], process_dir=str(tmp_path)).decode())
    assert got[("capy_stage_duration_seconds_count", (("outcome", "succeeded"), ("stage", "fetch")))] == 2
    assert got[("capy_metrics_source_up", (("source", "process_files"),))] == 0
    (tmp_path / "counter_999999.db").unlink()
    (tmp_path / "worker-b" / "histogram_999998.db").unlink()
    got = samples(scrape.render([], process_dir=str(tmp_path)).decode())
    assert got[("capy_metrics_source_up", (("source", "process_files"),))] == 1


def test_each_metric_name_has_one_help_and_type_line_and_its_samples_together(tmp_path: Path):
    # Every source yields capy_metrics_source_up: it was printed once per source, HELP
    # and TYPE included, which the text format forbids (promtool refuses the scrape).
    (tmp_path / "counter_999999.db").write_bytes(b"")
    text = scrape.render(
        [
            scrape.JobGauges(lambda: []),
            scrape.QueueGauges("amqp://broker.invalid", ["capy.fetch"], depth=lambda names: {}),
        ],
        process_dir=str(tmp_path),
    ).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    up = [line for line in text.splitlines() if line.startswith("capy_metrics_source_up{")]
    assert sorted(up) == [
        'capy_metrics_source_up{source="broker"} 1.0',
        'capy_metrics_source_up{source="database"} 1.0',
        'capy_metrics_source_up{source="process_files"} 0.0',
    ]
    lines = text.splitlines()
    first, last = lines.index(min(up, key=lines.index)), lines.index(max(up, key=lines.index))
    assert last - first == 2  # one group


def test_a_request_id_is_the_clients_when_sane_else_new():
    assert request_id("9f0c-4b1e.trace:1", new=lambda: "new") == "9f0c-4b1e.trace:1"
    for hostile in ("", "has space", "line\nbreak", "x" * 129, "é", "-starts-with-dash"):
        assert request_id(hostile, new=lambda: "new") == "new"


class JobResource:
    def on_get(self, req, resp, job_id):
        resp.media = {"id": job_id}


def client(*, token: str = "", open_without_token: bool = False) -> falcon.testing.TestClient:
    app = falcon.App(middleware=[RequestObservation()])
    errors.install(app)
    app.add_route("/v1/jobs/{job_id}", JobResource())
    app.add_route(
        "/metrics",
        MetricsResource(
            [scrape.JobGauges(lambda: [])],
            token=token,
            open_without_token=open_without_token,
            process_dir=lambda: None,
        ),
    )
    return falcon.testing.TestClient(app)


def test_requests_are_counted_by_route_template_and_their_id_returned():
    api = client(open_without_token=True)
    before = value("capy_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200")
    sent = api.simulate_get("/v1/jobs/job_secretish123", headers={"X-Request-ID": "req-42"})
    assert sent.status_code == 200 and sent.headers["X-Request-ID"] == "req-42"
    made = api.simulate_get("/v1/jobs/job_other")
    assert len(made.headers["X-Request-ID"]) == 32 and made.headers["X-Request-ID"] != "req-42"
    api.simulate_get("/nowhere/job_lost")
    text = api.simulate_get("/metrics").text
    assert (
        value("capy_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") == before + 2
    )
    assert value("capy_http_requests_total", method="GET", route="unmatched", status="404") >= 1
    assert value("capy_http_request_duration_seconds_count", method="GET", route="/v1/jobs/{job_id}") >= 2
    assert "job_secretish123" not in text and "job_lost" not in text
    assert "capy_jobs{" in text


def test_a_made_up_method_is_counted_as_other_not_as_a_series_of_its_own():
    # gunicorn passes on any upper-case token as a method: one series each would let
    # anyone grow every process's metric files and every scrape without limit.
    api = client(open_without_token=True)

    def send(method: str, path: str) -> str:
        # Straight to the WSGI app: Falcon's test client validates the method itself.
        answer = falcon.testing.StartResponseMock()
        api.app(falcon.testing.create_environ(path, method=method), answer)
        return answer.status

    before = value("capy_http_requests_total", method="other", route="/v1/jobs/{job_id}", status="400")
    for method in ("XYZZY", "PROPFIND1", "AAAAAAAAAAAAAAAAAAAA"):
        assert send(method, "/v1/jobs/job_1").startswith("400")
    assert send("QWERTY", "/nowhere").startswith("404")
    text = api.simulate_get("/metrics").text
    assert (
        value("capy_http_requests_total", method="other", route="/v1/jobs/{job_id}", status="400")
        == before + 3
    )
    assert value("capy_http_request_duration_seconds_count", method="other", route="unmatched") >= 1
    assert not any(m in text for m in ("XYZZY", "PROPFIND1", "AAAAAAAAAAAAAAAAAAAA", "QWERTY"))


def test_metrics_need_the_token_when_one_is_set_and_are_closed_in_production_without_one():
    guarded = client(token="metrics-token-0123456789")
    assert guarded.simulate_get("/metrics").status_code == 401
    assert guarded.simulate_get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = guarded.simulate_get("/metrics", headers={"Authorization": "Bearer metrics-token-0123456789"})
    assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    closed = client().simulate_get("/metrics")
    assert closed.status_code == 401 and "CAPY_METRICS_TOKEN" in closed.json["error"]
    assert client(open_without_token=True).simulate_get("/metrics").status_code == 200


def test_a_metrics_directory_that_is_not_one_stops_the_start(tmp_path, monkeypatch):
    from pipeline.config import ConfigError

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert scrape.check_multiprocess_dir() is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert scrape.check_multiprocess_dir() == str(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a directory: create it"):
        scrape.check_multiprocess_dir()
