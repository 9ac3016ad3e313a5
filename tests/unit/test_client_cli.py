"""The client CLI `capydb-import` against a fake HTTP layer: arguments, requests, output, exit codes."""

from __future__ import annotations

import json

import pytest
import requests

from client.cli import run
from client.errors import Exit
from tests.support.client_fakes import (
    API,
    KEY,
    PROJECT,
    FakeResponse,
    FakeSession,
    Outputs,
    completed,
    error,
    job,
    ok,
)

IMPORTS = f"{API}/v1/projects/{PROJECT}/imports"
JOB = f"{API}/v1/jobs/job_1"
SOURCE = "postgresql://app:hunter2@db.example.invalid/app"
COMMON = ["--api", API, "--key", KEY, "--project", PROJECT]


def run_cli(argv: list[str], session: FakeSession, **kwargs) -> tuple[int, Outputs]:
    outputs = Outputs(session, **kwargs)
    return run(argv, outputs.io), outputs


def assert_no_secrets(outputs: Outputs) -> None:
    assert KEY not in outputs.out + outputs.err
    assert "hunter2" not in outputs.out + outputs.err


# Arguments.


def test_a_source_is_required(capsys):
    code, outputs = run_cli(["import", *COMMON], FakeSession())
    assert code == Exit.USAGE
    assert "no source: pass --source-url URL or --file DUMP" in outputs.err


def test_two_sources_are_a_usage_error(capsys, tmp_path):
    code, _ = run_cli(["import", *COMMON, "--source-url", SOURCE, "--file", str(tmp_path)], FakeSession())
    assert code == Exit.USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_missing_key_names_the_flag_and_the_variable():
    code, outputs = run_cli(
        ["import", "--api", API, "--project", PROJECT, "--source-url", SOURCE], FakeSession()
    )
    assert code == Exit.USAGE
    assert "--key is missing: pass --key or set CAPYDB_API_KEY" in outputs.err


def test_an_api_url_that_is_not_http_is_a_usage_error():
    code, outputs = run_cli(["status", "job_1", "--api", "ftp://x.invalid", "--key", KEY], FakeSession())
    assert code == Exit.USAGE
    assert "must start with http:// or https://" in outputs.err


def test_a_dump_that_is_not_a_file_is_a_usage_error(tmp_path):
    code, outputs = run_cli(["import", *COMMON, "--file", str(tmp_path / "missing.dump")], FakeSession())
    assert code == Exit.USAGE
    assert "missing.dump is not a file" in outputs.err


def test_url_key_project_and_source_come_from_the_environment():
    session = FakeSession(("POST", IMPORTS, ok({"job": job()}, 202)))
    env = {
        "CAPYDB_API_URL": API + "/v1/",
        "CAPYDB_API_KEY": KEY,
        "CAPYDB_PROJECT_ID": PROJECT,
        "CAPYDB_SOURCE_URL": SOURCE,
    }
    code, outputs = run_cli(["import"], session, env=env)
    assert code == Exit.OK
    [call] = session.calls
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.kwargs["json"] == {"confirm": True, "recreate": False, "source_url": SOURCE}
    assert "capydb-import status job_1 --wait" in outputs.out
    assert_no_secrets(outputs)


# Starting and following an import.


def test_import_sends_an_idempotency_key_and_returns_at_once_without_wait():
    session = FakeSession(("POST", IMPORTS, ok({"job": job()}, 202)))
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE, "--recreate"], session)
    assert code == Exit.OK
    [call] = session.calls
    assert call.headers["Idempotency-Key"] == "idem-1"
    assert call.kwargs["json"]["recreate"] is True
    assert "Import job_1 is pending" in outputs.out
    assert_no_secrets(outputs)


def test_a_given_idempotency_key_is_sent_and_a_found_job_is_said_so():
    session = FakeSession(("POST", IMPORTS, ok({"job": job("running")}, 200)))
    code, outputs = run_cli(
        ["import", *COMMON, "--source-url", SOURCE, "--idempotency-key", "deploy-42"], session
    )
    assert code == Exit.OK
    assert session.calls[0].headers["Idempotency-Key"] == "deploy-42"
    assert "already started: import job_1" in outputs.err


def test_import_wait_shows_progress_and_prints_the_report():
    running = job(
        "running",
        stage="restore",
        progress={
            "stage": "restore",
            "step": "copy",
            "phase": "copying data",
            "tables_done": 3,
            "tables_total": 15,
            "bytes_done": 1048576,
            "bytes_total": 4194304,
            "rows_done": 12345,
            "rows_per_second": 617,
            "eta_seconds": 75,
        },
    )
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)),
        ("GET", JOB, ok({"job": job()})),
        ("GET", JOB, ok({"job": running})),
        ("GET", JOB, ok({"job": completed()})),
    )
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE, "--wait"], session)
    assert code == Exit.OK
    assert "pending: queued" in outputs.err
    assert (
        "restore: copying data · tables 3/15 · 1.0 MiB of 4.0 MiB (25%) · 12,345 rows (617 rows/s) · ETA 1m15s"
        in outputs.err
    )
    assert "Import job_1 completed in 1m05s: 2 tables, 1,200 rows" in outputs.out
    assert "source: postgresql://app:***@db.example.invalid/app" in outputs.out
    assert "the previous database is kept as capy_prj_123_replaced_1" in outputs.out
    lines = outputs.out.splitlines()
    assert any("public.film" in line and "1,000" in line and "ok" in line for line in lines)
    assert any("public.actor_actor_id_seq" in line for line in lines)
    assert any("EVENT TRIGGER audit" in line and "event triggers need a superuser" in line for line in lines)
    assert outputs.sleeps == [2.0, 2.0]  # between the three polls
    assert_no_secrets(outputs)


def test_a_failed_import_exits_1_with_the_servers_message():
    failed = job(
        "failed",
        stage="preflight",
        error="password authentication failed; check the user name and password",
        retry_classification="permanent",
        last_exit_code=1,
        last_stderr="psql: error: [bold]FATAL[/bold]: password authentication failed",
    )
    session = FakeSession(("POST", IMPORTS, ok({"job": job()}, 202)), ("GET", JOB, ok({"job": failed})))
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE, "--wait"], session)
    assert code == Exit.FAILED
    assert (
        "Import job_1 failed (permanent): password authentication failed; check the user name" in outputs.out
    )
    assert "last command exited 1" in outputs.out
    assert "[bold]FATAL[/bold]" in outputs.out  # the server's text, not rich markup


def test_a_cancelled_import_exits_3():
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)), ("GET", JOB, ok({"job": job("cancelled")}))
    )
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE, "--wait"], session)
    assert code == Exit.CANCELLED
    assert "Import job_1 cancelled: the project's database was left as it was." in outputs.out


def test_json_prints_one_object_and_no_progress():
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)),
        ("GET", JOB, ok({"job": job("running")})),
        ("GET", JOB, ok({"job": completed()})),
    )
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE, "--wait", "--json"], session)
    assert code == Exit.OK
    assert json.loads(outputs.out)["job"]["report"]["row_count"] == 1200
    assert outputs.err == ""


# Refusals, rate limits and the network.


def test_a_refusal_exits_5_with_the_servers_message_and_never_the_key():
    session = FakeSession(
        ("POST", IMPORTS, error(409, "project prj_123 already has an active import: job_0"))
    )
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE], session)
    assert code == Exit.REFUSED
    assert "capydb-import: error: project prj_123 already has an active import: job_0" in outputs.err
    assert_no_secrets(outputs)


def test_json_errors_are_json():
    session = FakeSession(("GET", JOB, error(404, "job job_1 does not exist")))
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY, "--json"], session)
    assert code == Exit.REFUSED
    assert json.loads(outputs.out) == {"error": "job job_1 does not exist", "exit_code": 5}


def test_429_waits_for_retry_after_then_retries():
    session = FakeSession(
        ("POST", IMPORTS, error(429, "rate limit exceeded; retry in 7 s", **{"Retry-After": "7"})),
        ("POST", IMPORTS, ok({"job": job()}, 202)),
    )
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE], session)
    assert code == Exit.OK
    assert outputs.sleeps == [7.0]
    assert "rate limited by the API: rate limit exceeded; retry in 7 s (waiting 7 s)" in outputs.err
    assert [c.headers["Idempotency-Key"] for c in session.calls] == ["idem-1", "idem-1"]


def test_429_that_does_not_end_is_a_refusal():
    limited = error(429, "rate limit exceeded", **{"Retry-After": "1000"})
    session = FakeSession(*[("GET", JOB, limited)] * 5)
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY], session)
    assert code == Exit.REFUSED
    assert outputs.sleeps == [120.0] * 4  # Retry-After, capped
    assert "capydb-import: error: rate limit exceeded" in outputs.err


def test_an_unreachable_api_exits_4_after_a_few_retries():
    refused = requests.ConnectionError("[Errno 111] Connection refused")
    session = FakeSession(*[("POST", IMPORTS, refused)] * 4)
    code, outputs = run_cli(["import", *COMMON, "--source-url", SOURCE], session)
    assert code == Exit.UNREACHABLE
    assert outputs.sleeps == [1, 2, 4]
    assert f"could not reach the API at {API} (connection refused)" in outputs.err
    # A retried import is the same request: the server returns the first job, not a second.
    assert {c.headers["Idempotency-Key"] for c in session.calls} == {"idem-1"}


def test_an_upload_form_is_not_requested_twice_after_a_network_error():
    session = FakeSession(("POST", f"{IMPORTS}/uploads", requests.ConnectionError("reset")))
    code, _ = run_cli(["upload", *COMMON, "--file", __file__], session)
    assert code == Exit.UNREACHABLE
    assert len(session.calls) == 1


def test_an_answer_that_is_not_the_api_says_so():
    session = FakeSession(("GET", JOB, FakeResponse(404, raw_text="<html>nginx</html>")))
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY], session)
    assert code == Exit.REFUSED
    assert "is not a CapyDB API error; is --api the right URL?" in outputs.err


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"status": "ok"},
        {"job": "job_1"},
        {"job": {"state": "running"}},
        {"job": {"id": "job_1", "state": "running", "progress": "copying"}},
        {"job": {"id": "job_1", "state": "completed", "report": ["x"]}},
    ],
)
def test_a_2xx_answer_that_is_not_the_apis_exits_4_without_a_traceback(body):
    # Another service at --api (or a proxy) answering 200 made the client raise
    # KeyError, TypeError or AttributeError with a traceback.
    for argv, method, url in (
        (["status", "job_1"], "GET", JOB),
        (["cancel", "job_1"], "POST", f"{JOB}/cancel"),
        (["import", "--project", PROJECT, "--source-url", SOURCE], "POST", IMPORTS),
        (["jobs", "--project", PROJECT], "GET", f"{API}/v1/projects/{PROJECT}/jobs"),
        (["preflight", "--project", PROJECT, "--source-url", SOURCE], "POST", f"{IMPORTS}/preflight"),
    ):
        session = FakeSession((method, url, ok(body)))
        code, outputs = run_cli([*argv, "--api", API, "--key", KEY], session)
        assert code == Exit.UNREACHABLE, (argv, body)
        assert "not a CapyDB API answer; is --api the right URL?" in outputs.err
        assert_no_secrets(outputs)


def test_a_report_or_preflight_this_client_cannot_lay_out_is_printed_as_json():
    # A report whose "tables" is a list (an API newer than the client) raised
    # AttributeError with a traceback after the import had completed.
    odd = {**completed(), "report": {"tables": ["public.film"], "row_count": "many"}}
    code, outputs = run_cli(
        ["status", "job_1", "--api", API, "--key", KEY], FakeSession(("GET", JOB, ok({"job": odd})))
    )
    assert code == Exit.OK
    assert '"tables": [' in outputs.out and "not in a shape this client can lay out" in outputs.err
    preflight = {
        "ok": True,
        "checks": [{"name": "x", "status": "pass"}],
        "source": {"extensions": ["plpgsql"]},
    }
    session = FakeSession(("POST", f"{IMPORTS}/preflight", ok({"preflight": preflight})))
    code, outputs = run_cli(["preflight", *COMMON, "--source-url", SOURCE], session)
    assert code == Exit.OK and '"extensions": [' in outputs.out
    session = FakeSession(("GET", f"{API}/v1/projects/{PROJECT}/jobs", ok({"jobs": [job(source="live")]})))
    code, outputs = run_cli(["jobs", *COMMON], session)
    assert code == Exit.OK and '"source": "live"' in outputs.out


def test_an_upload_form_that_is_not_the_apis_exits_4():
    session = FakeSession(("POST", f"{IMPORTS}/uploads", ok({"upload": {"fields": {}}}, 201)))
    code, outputs = run_cli(["upload", *COMMON, "--file", __file__], session)
    assert code == Exit.UNREACHABLE
    assert 'an upload without "object_key", not a CapyDB API answer' in outputs.err


@pytest.mark.parametrize("header", ["nan", "-inf", "inf", "soon"])
def test_a_retry_after_that_is_not_a_number_of_seconds_waits_the_default(header):
    session = FakeSession(
        ("GET", JOB, error(429, "rate limit exceeded", **{"Retry-After": header})),
        ("GET", JOB, ok({"job": job("running")})),
    )
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY], session)
    assert code == Exit.OK
    assert outputs.sleeps == [5.0]


def test_following_survives_a_short_outage_of_the_api():
    down = requests.ConnectionError("Connection refused")
    session = FakeSession(
        ("GET", JOB, ok({"job": job("running", stage="restore")})),
        *[("GET", JOB, down)] * 4,  # one poll: four attempts
        ("GET", JOB, error(503, "the service's database is unavailable; try again shortly")),
        ("GET", JOB, ok({"job": completed()})),
    )
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY, "--wait"], session)
    assert code == Exit.OK
    assert "the import goes on on the server, still watching" in outputs.err
    assert "the API is unavailable: the service's database is unavailable" in outputs.err


# Ctrl-C.


def _interrupt_on_first_sleep(count: int) -> None:
    if count == 1:
        raise KeyboardInterrupt


def test_ctrl_c_without_a_terminal_leaves_the_import_running():
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)), ("GET", JOB, ok({"job": job("running")}))
    )
    code, outputs = run_cli(
        ["import", *COMMON, "--source-url", SOURCE, "--wait"], session, sleep=_interrupt_on_first_sleep
    )
    assert code == Exit.INTERRUPTED
    assert (
        "import job_1 goes on on the server: follow it with `capydb-import status job_1 --wait`"
        in outputs.err
    )
    assert [c.method for c in session.calls] == ["POST", "GET"]  # no cancel


def test_ctrl_c_on_a_terminal_asks_and_cancels_when_told_to():
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)),
        ("GET", JOB, ok({"job": job("running")})),
        (
            "POST",
            f"{JOB}/cancel",
            ok({"job": job("running", cancel_requested_at="2026-11-29T10:00:09Z")}, 202),
        ),
        ("GET", JOB, ok({"job": job("cancelled")})),
    )
    code, outputs = run_cli(
        ["import", *COMMON, "--source-url", SOURCE, "--wait"],
        session,
        interactive=True,
        answers=["y"],
        sleep=_interrupt_on_first_sleep,
    )
    assert outputs.questions == ["\nCancel import job_1 on the server? [y/N] "]
    assert code == Exit.CANCELLED
    assert "cancel requested; waiting for the import to stop" in outputs.err


def test_ctrl_c_answered_yes_after_the_import_ended_reports_how_it_ended():
    # The cancel's 409 ("already completed") ended the command with exit 5 and an
    # error, for an import that had completed.
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)),
        ("GET", JOB, ok({"job": job("running")})),
        (
            "POST",
            f"{JOB}/cancel",
            error(409, "job job_1 is already completed; only a pending or running import can be cancelled"),
        ),
        ("GET", JOB, ok({"job": completed()})),
    )
    code, outputs = run_cli(
        ["import", *COMMON, "--source-url", SOURCE, "--wait"],
        session,
        interactive=True,
        answers=["y"],
        sleep=_interrupt_on_first_sleep,
    )
    assert code == Exit.OK
    assert "not cancelled: job job_1 is already completed" in outputs.err
    assert "public.film" in outputs.out  # the report


def test_ctrl_c_on_a_terminal_answered_no_leaves_the_import_running():
    session = FakeSession(
        ("POST", IMPORTS, ok({"job": job()}, 202)), ("GET", JOB, ok({"job": job("running")}))
    )
    code, outputs = run_cli(
        ["import", *COMMON, "--source-url", SOURCE, "--wait"],
        session,
        interactive=True,
        answers=[""],
        sleep=_interrupt_on_first_sleep,
    )
    assert code == Exit.INTERRUPTED
    assert "goes on on the server" in outputs.err


# Other commands.


def test_status_of_a_finished_job_exits_by_its_state():
    session = FakeSession(("GET", JOB, ok({"job": job("failed", error="the dump is truncated")})))
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY], session)
    assert code == Exit.FAILED
    assert "failed: the dump is truncated" in outputs.out


def test_cancel_wait_follows_until_cancelled():
    session = FakeSession(
        (
            "POST",
            f"{JOB}/cancel",
            ok({"job": job("running", cancel_requested_at="2026-11-29T10:00:09Z")}, 202),
        ),
        ("GET", JOB, ok({"job": job("cancelled")})),
    )
    code, outputs = run_cli(["cancel", "job_1", "--api", API, "--key", KEY, "--wait"], session)
    assert code == Exit.OK
    assert "cancel requested: preflight: queued · cancelling" in outputs.err
    assert "Import job_1 cancelled" in outputs.out


def test_jobs_lists_a_projects_jobs():
    failed = job("failed", id="job_2", error="the dump is truncated")
    session = FakeSession(("GET", f"{IMPORTS[: -len('/imports')]}/jobs", ok({"jobs": [failed, completed()]})))
    code, outputs = run_cli(["jobs", *COMMON, "--limit", "2"], session)
    assert code == Exit.OK
    assert session.calls[0].kwargs["params"] == {"limit": 2}
    assert any(
        "job_2" in line and "failed" in line and "truncated" in line for line in outputs.out.splitlines()
    )


def test_jobs_limit_is_checked():
    code, outputs = run_cli(["jobs", *COMMON, "--limit", "500"], FakeSession())
    assert code == Exit.USAGE
    assert "--limit must be from 1 to 100" in outputs.err


@pytest.mark.parametrize(("ok_", "code"), [(True, Exit.OK), (False, Exit.FAILED)])
def test_preflight_prints_the_checks_and_exits_by_ok(ok_, code):
    checks = [
        {"name": "source_reachable", "status": "pass", "detail": "connected"},
        {"name": "source_size_within_plan", "status": "warn", "detail": "the source is 85% of the limit"},
    ]
    if not ok_:
        checks.append(
            {
                "name": "extensions_available_on_target",
                "status": "fail",
                "detail": "timescaledb is not allowed",
            }
        )
    preflight = {
        "checks": checks,
        "ok": ok_,
        "source": {
            "server_version": "16.4",
            "database_size_bytes": 10 * 1024 * 1024,
            "extensions": [{"name": "plpgsql", "version": "1.0"}],
        },
        "storage_limit_bytes": 1024**3,
        "target_version": "17.2",
    }
    session = FakeSession(("POST", f"{IMPORTS}/preflight", ok({"preflight": preflight})))
    got, outputs = run_cli(["preflight", *COMMON, "--source-url", SOURCE], session)
    assert got == code
    assert session.calls[0].kwargs["json"] == {"recreate": False, "source_url": SOURCE}
    lines = outputs.out.splitlines()
    assert any("source_size_within_plan" in line and "warn" in line and "85%" in line for line in lines)
    assert "source: PostgreSQL 16.4, 10.0 MiB, extensions plpgsql 1.0" in outputs.out
    assert "target: PostgreSQL 17.2, storage limit 1.0 GiB" in outputs.out
    if ok_:
        assert "Preflight passed" in outputs.out
    else:
        assert any("extensions_available_on_target" in line and "fail" in line for line in lines)
        assert "Preflight failed: fix the failing checks before importing." in outputs.out


def test_a_timeout_says_how_long_the_client_waited():
    session = FakeSession(*[("GET", JOB, requests.ReadTimeout("read timed out"))] * 4)
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", KEY], session)
    assert code == Exit.UNREACHABLE
    assert f"capydb-import: error: could not reach the API at {API} (no answer within 30 s)" in outputs.err
    assert session.calls[0].kwargs["timeout"] == 30


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://api.capydb.invalid", "http://api.capydb.invalid"),
        ("https://api.capydb.invalid/v1/", "https://api.capydb.invalid"),
        ("https://capydb.invalid/imports/", "https://capydb.invalid/imports"),
    ],
)
def test_the_api_url_may_end_with_a_slash_or_v1(given, base):
    from client.api import base_url

    assert base_url(given) == base


def test_an_api_url_with_credentials_is_refused_without_echoing_them():
    code, outputs = run_cli(
        ["status", "job_1", "--api", "https://u:hunter2@api.capydb.invalid", "--key", KEY], FakeSession()
    )
    assert code == Exit.USAGE
    assert "must not hold credentials" in outputs.err
    assert_no_secrets(outputs)


@pytest.mark.parametrize("api", ["http://[::1", "https://[api.capydb.invalid/"])
def test_an_api_url_python_cannot_split_is_a_usage_error(api):
    code, outputs = run_cli(["status", "job_1", "--api", api, "--key", KEY], FakeSession())
    assert code == Exit.USAGE
    assert "must start with http:// or https:// and name a host" in outputs.err


@pytest.mark.parametrize("key", [KEY + "…", KEY + "\n", "capy_live_a b", KEY + "\x00"])
def test_a_key_that_cannot_be_a_bearer_token_is_a_usage_error_that_does_not_echo_it(key):
    # requests raised UnicodeEncodeError (a traceback) for the pasted "…".
    code, outputs = run_cli(["status", "job_1", "--api", API, "--key", key], FakeSession())
    assert code == Exit.USAGE
    assert "the API key must be printable ASCII without spaces" in outputs.err
    assert_no_secrets(outputs)


@pytest.mark.parametrize("key", ["ключ-1", "a\nb", "x" * 256])
def test_an_idempotency_key_the_api_would_refuse_is_a_usage_error(key):
    # One with a character beyond Latin-1 made requests raise UnicodeEncodeError.
    code, outputs = run_cli(
        ["import", *COMMON, "--source-url", SOURCE, "--idempotency-key", key], FakeSession()
    )
    assert code == Exit.USAGE
    assert "--idempotency-key must be 1 to 255 printable ASCII characters" in outputs.err


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "../projects/prj_123/audit-events"],
        ["cancel", "../projects/prj_123/imports/uploads"],
        ["status", "job_1?limit=1"],
        ["jobs", "--project", "prj_1/../../jobs/job_2"],
        ["import", "--project", "../jobs/job_2/cancel#", "--source-url", SOURCE],
    ],
)
def test_an_id_that_is_not_one_is_refused_before_any_request(argv):
    # requests normalises "/v1/jobs/../projects/…": the request went to another route.
    code, outputs = run_cli([*argv, "--api", API, "--key", KEY], FakeSession())
    assert code == Exit.USAGE
    assert "must be an ID of 1 to 64 letters, digits, '_' or '-'" in outputs.err


def test_the_client_loads_nothing_of_the_server():
    """The client talks to the API only: importing it loads no app, pipeline or stages module."""
    import subprocess
    import sys

    probe = (
        "import sys, client.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'pipeline', 'stages', 'peewee', 'psycopg2')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_without_a_terminal_progress_prints_on_change_and_every_15_s():
    import io

    from rich.console import Console

    from client.views import LineView

    now = [0.0]
    file = io.StringIO()
    view = LineView(Console(file=file, width=200), clock=lambda: now[0])
    copying = {"phase": "copying rows", "step": "data", "rows_done": 10}
    for at, rows in ((0, 10), (5, 20), (14.9, 30), (15, 40), (16, 50)):
        now[0] = at
        view.update(job("running", stage="restore", progress={**copying, "rows_done": rows}))
    now[0] = 17
    view.update(job("running", stage="restore", progress={"phase": "building indexes", "step": "indexes"}))
    assert file.getvalue().splitlines() == [
        "restore: copying rows [data] · 10 rows",
        "restore: copying rows [data] · 40 rows",
        "restore: building indexes",
    ]
