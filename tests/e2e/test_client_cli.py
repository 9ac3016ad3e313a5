"""End to end: the users' client `capydb-import` against real gunicorn and dramatiq processes."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.support import pg
from tests.support.processes import BIN


def capydb_import(service, tenant, *args: str, flags: bool = False) -> subprocess.CompletedProcess:
    """Run the client as a user would: URL, key and project from the environment (or as
    flags when `flags`), output to pipes (no terminal: progress prints as lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPY_", "CAPYDB_", "COLUMNS"))}
    connection = ["--api", service.base_url, "--key", tenant["key"]] if flags else []
    if not flags:
        env.update(CAPYDB_API_URL=service.base_url, CAPYDB_API_KEY=tenant["key"])
    env["CAPYDB_PROJECT_ID"] = tenant["project"]["id"]
    done = subprocess.run(
        [str(BIN / "capydb-import"), *args, *connection], env=env, capture_output=True, text=True, timeout=600
    )
    assert tenant["key"] not in done.stdout + done.stderr
    return done


def job_id_of(done: subprocess.CompletedProcess) -> str:
    started = [line for line in done.stderr.splitlines() if line.startswith("started import job_")]
    assert len(started) == 1, done.stderr
    return started[0].removeprefix("started import ")


def squash(text: str) -> str:
    """`text` with every run of whitespace as one space (the output may wrap long messages)."""
    return " ".join(text.split())


def table_row(stdout: str, table: str) -> list[str]:
    """The cells of the report table's row for `table`."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line.strip("│┃| "))]
        if cells and cells[0] == table:
            return cells
    raise AssertionError(f"no row for {table} in:\n{stdout}")


@pytest.mark.e2e
def test_client_imports_a_dump_file_and_prints_the_report(service, tenant, corpus_source, tmp_path):
    source = corpus_source("pagila")
    dump = pg.make_dump(source, "custom", tmp_path / "pagila.dump")
    done = capydb_import(service, tenant, "import", "--file", str(dump), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done)
    # The upload, then the job's progress (how many polls see it running depends on timing).
    assert "uploading pagila.dump (" in done.stderr and "uploaded pagila.dump in " in done.stderr
    assert done.stderr.splitlines()[-1] == "completed"
    assert f"Import {job_id} completed in " in done.stdout
    counts = pg.row_counts(source)
    assert f"{len(counts)} tables, {sum(counts.values()):,} rows" in done.stdout
    assert table_row(done.stdout, "public.payment_p2022_03")[1:] == [
        f"{counts['public.payment_p2022_03']:,}",
        f"{counts['public.payment_p2022_03']:,}",
        "ok",
    ]
    assert pg.row_counts(tenant["project"]["database_name"]) == counts
    # The same job, as `status --json` shows it to scripts.
    shown = capydb_import(service, tenant, "status", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["job"]["report"]["row_count"] == sum(counts.values())


@pytest.mark.e2e
def test_client_preflights_and_imports_a_live_source(service, tenant, corpus_source):
    source = pg.url_for(corpus_source("chinook"), sslmode="disable")
    checked = capydb_import(service, tenant, "preflight", "--source-url", source, flags=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert table_row(checked.stdout, "source_reachable")[1] == "pass"
    assert "Preflight passed: the import can go ahead." in checked.stdout

    done = capydb_import(service, tenant, "import", "--source-url", source, "--wait", flags=True)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done)
    assert f"Import {job_id} completed in " in done.stdout
    counts = pg.row_counts(corpus_source("chinook"))
    assert table_row(done.stdout, "public.track")[1:] == [f"{counts['public.track']:,}"] * 2 + ["ok"]
    assert pg.row_counts(tenant["project"]["database_name"]) == counts

    listed = capydb_import(service, tenant, "jobs", "--json", flags=True)
    assert [(j["id"], j["state"]) for j in json.loads(listed.stdout)["jobs"]] == [(job_id, "completed")]

    # A second import into the now non-empty database is refused by preflight: the job fails.
    again = capydb_import(service, tenant, "import", "--source-url", source, "--wait", flags=True)
    assert again.returncode == 1, again.stdout + again.stderr
    failed = json.loads(capydb_import(service, tenant, "status", job_id_of(again), "--json").stdout)["job"]
    assert failed["state"] == "failed" and "already holds tables" in failed["error"]
    assert squash(
        f"Import {failed['id']} failed ({failed['retry_classification']}): {failed['error']}"
    ) in squash(again.stdout)


@pytest.mark.e2e
def test_client_reports_a_dump_the_service_cannot_read(service, tenant, tmp_path):
    dump = tmp_path / "notes.txt"
    dump.write_bytes(b"\x00\x01 this is not a dump made by pg_dump\n" * 64)
    done = capydb_import(service, tenant, "import", "--file", str(dump), "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    failed = json.loads(capydb_import(service, tenant, "status", job_id_of(done), "--json").stdout)["job"]
    assert failed["state"] == "failed" and failed["error"]
    assert squash(f"Import {failed['id']} failed") in squash(done.stdout)
    assert squash(failed["error"]) in squash(done.stdout)


@pytest.mark.e2e
def test_client_refusals_exit_5_with_the_apis_message(service, tenant):
    done = capydb_import(service, tenant, "status", "job_doesnotexist")
    assert done.returncode == 5
    assert done.stderr.strip() == "capydb-import: error: job job_doesnotexist does not exist"
