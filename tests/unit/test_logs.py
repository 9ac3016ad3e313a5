"""Log lines: JSON or text, the bound context on every line (threads the service starts
included), the tool's name on a tool's output, secrets redacted. No sockets."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

import pytest

from pipeline import logs
from pipeline.lease import Heartbeat
from stages.errors import CommandFailed
from stages.tools.commands import PgCommand


@pytest.fixture
def captured():
    """A logger whose lines go through the service's filter and JSON formatter."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    def lines() -> list[dict]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_a_json_line_carries_the_bound_fields(captured):
    log = logging.getLogger("pipeline.runner")
    with logs.bound(job_id="job_1", stage="restore", attempt=None):
        log.info("before the claim")
        logs.bind(attempt=2)
        log.warning("job %s: %s", "job_1", "running")
    log.info("after")
    before, during, after = captured()
    assert before["job_id"] == "job_1" and before["stage"] == "restore" and "attempt" not in before
    assert during == {
        "time": during["time"],
        "level": "warning",
        "logger": "pipeline.runner",
        "message": "job job_1: running",
        "pid": during["pid"],
        "job_id": "job_1",
        "stage": "restore",
        "attempt": 2,
    }
    assert during["time"].endswith("Z") and "T" in during["time"]
    # The block's fields end with it, even those bound inside it.
    assert not {"job_id", "stage", "attempt"} & set(after)


def test_secrets_are_redacted_in_the_message_and_the_traceback(captured):
    log = logging.getLogger("app")
    try:
        raise RuntimeError("cannot reach postgresql://app:hunter2@db.example.com/app")
    except RuntimeError:
        log.exception(
            "connecting with password=hunter2 and key %s, header Authorization: Bearer tok-123",
            "capy_live_abcdef123456",
        )
    (line,) = captured()
    text = json.dumps(line)
    for secret in ("hunter2", "capy_live_abcdef123456", "tok-123"):
        assert secret not in text
    assert "postgresql://app:***@db.example.com/app" in line["exc_info"]
    assert "capy_live_***" in line["message"] and "Bearer ***" in line["message"]


def test_the_text_format_keeps_the_development_layout_with_the_fields():
    record = logging.LogRecord(
        "pipeline.runner", logging.INFO, __file__, 1, "job %s started", ("job_1",), None
    )
    with logs.bound(job_id="job_1", stage="fetch", attempt=1):
        logs.ContextFilter().filter(record)
    text = logs.TextFormatter().format(record)
    assert text.endswith(" INFO pipeline.runner: job job_1 started [job_id=job_1 stage=fetch attempt=1]")


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="json, text"):
        logs.formatter("xml")


def test_configure_formats_every_handler_once(monkeypatch):
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    monkeypatch.setattr(root, "handlers", [handler])
    logs.configure("text")
    logs.configure("json")
    assert isinstance(handler.formatter, logs.JsonFormatter)
    assert sum(isinstance(f, logs.ContextFilter) for f in handler.filters) == 1


def test_configure_sets_the_level_by_name_or_number(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(io.StringIO())])
    monkeypatch.setattr(root, "level", root.level)
    logs.configure("json", "debug")
    assert root.level == logging.DEBUG
    logs.configure("json", logging.WARNING)
    assert root.level == logging.WARNING
    logs.configure("json")
    assert root.level == logging.INFO


class Noisy(PgCommand):
    program = "noisy"


def test_a_tools_output_carries_its_name_and_the_stage_that_ran_it(captured, tmp_path: Path):
    """The reader thread logs each stderr line with the tool's name, in the context of
    the thread that started the tool; secrets passed to the run are masked."""
    program = tmp_path / "noisy"
    program.write_text("#!/bin/sh\necho 'noisy: error: login as app:s3cret-pw failed' >&2\nexit 1\n")
    program.chmod(0o755)
    with logs.bound(job_id="job_2", stage="restore", attempt=1), pytest.raises(CommandFailed):
        Noisy(str(tmp_path)).run([], secrets=["s3cret-pw"])
    tool_lines = [line for line in captured() if line.get("tool") == "noisy"]
    printed = [line for line in tool_lines if "login as" in line["message"]]
    assert printed, tool_lines
    assert printed[0]["message"] == "noisy: error: login as app:*** failed"
    assert (printed[0]["job_id"], printed[0]["stage"], printed[0]["attempt"]) == ("job_2", "restore", 1)
    assert any(line["message"].startswith("running ") for line in tool_lines)


def test_the_heartbeat_thread_logs_in_the_stages_context(captured, monkeypatch):
    seen = threading.Event()

    def fail_beat(self) -> bool:
        logging.getLogger("pipeline.lease").warning("beat")
        seen.set()
        return False

    class NoDatabase:  # the thread closes its connection at the end; it never opened one
        def is_closed(self) -> bool:
            return True

    monkeypatch.setattr(Heartbeat, "_extend", fail_beat)
    monkeypatch.setattr("pipeline.lease.database", NoDatabase())
    with logs.bound(job_id="job_3", stage="fetch", attempt=3):
        beat = Heartbeat("job_3", "me", 0.05)
    with beat:
        assert seen.wait(10)
    line = next(line for line in captured() if line["message"] == "beat")
    assert (line["job_id"], line["stage"], line["attempt"]) == ("job_3", "fetch", 3)


def test_one_line_per_record_even_with_newlines(captured):
    logging.getLogger("x").info("two\nlines")
    assert [line["message"] for line in captured()] == ["two\nlines"]


# A request's path is percent-decoded (GET /v1/jobs/%0A… logs "\n…"): no message may
# start a line of its own, for "\n" or for what else str.splitlines takes as a break.
FORGED = '/v1/jobs/x\n2026-11-29 ERROR app: forged\r\u2028{"level": "error"}\x85\u2029end'


def test_a_json_line_cannot_be_split_by_a_message(captured):
    logging.getLogger("app.access").info("GET %s 404", FORGED)
    assert [line["message"] for line in captured()] == [f"GET {FORGED} 404"]


def test_a_text_line_cannot_be_split_by_a_message():
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "GET %s 404", (FORGED,), None)
    text = logs.TextFormatter().format(record)
    assert text.splitlines() == [text]
    assert text.endswith(
        'GET /v1/jobs/x\\n2026-11-29 ERROR app: forged\\r\\u2028{"level": "error"}\\u0085\\u2029end 404'
    )


def test_the_log_format_is_json_in_production_and_text_in_development():
    from pipeline.config import ConfigError, Settings

    assert Settings.from_env({}).log_format == "json"
    assert Settings.from_env({"CAPY_ENV": "development"}).log_format == "text"
    assert Settings.from_env({"CAPY_ENV": "development", "CAPY_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="CAPY_LOG_FORMAT must be json or text, not 'yaml'"):
        Settings.from_env({"CAPY_LOG_FORMAT": "yaml"})
    assert Settings.from_env({}).log_level == "info"
    assert Settings.from_env({"CAPY_LOG_LEVEL": " DEBUG "}).log_level == "debug"
    with pytest.raises(ConfigError, match="CAPY_LOG_LEVEL must be debug, info, warning or error, not 'loud'"):
        Settings.from_env({"CAPY_LOG_LEVEL": "loud"})
    settings = Settings.from_env({"CAPY_METRICS_TOKEN": " s3cret-token "})
    assert settings.metrics_token == "s3cret-token" and "s3cret-token" not in repr(settings)
