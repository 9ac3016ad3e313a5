"""The client CLI's upload through the API's presigned POST form, against a fake HTTP layer."""

from __future__ import annotations

import email.parser
import email.policy
import io

from client.cli import run
from client.errors import Exit
from client.render import progress_line
from tests.support.client_fakes import API, KEY, PROJECT, FakeResponse, FakeSession, Outputs, job, ok

IMPORTS = f"{API}/v1/projects/{PROJECT}/imports"
STORAGE = "http://s3.capydb.invalid/bucket"
FORM_KEY = f"imports/{PROJECT}/abc/dump"
COMMON = ["--api", API, "--key", KEY, "--project", PROJECT]


def upload(max_bytes: int = 10**9) -> dict:
    return {
        "object_key": FORM_KEY,
        "upload_url": STORAGE,
        "fields": {"key": FORM_KEY, "policy": "cG9saWN5", "x-amz-signature": "c2lnbmF0dXJl"},
        "method": "POST",
        "max_bytes": max_bytes,
        "expires_at": "2026-11-29T11:00:00Z",
    }


def form_parts(call) -> list[tuple[str, bytes]]:
    """The multipart body as a mail parser reads it: (name, content) in order."""
    head = f"Content-Type: {call.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + call.body)
    return [
        (part.get_param("name", header="content-disposition"), part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


def test_import_file_posts_the_form_then_starts_the_import(tmp_path):
    dump = tmp_path / "app.dump"
    content = b"PGDMP" + bytes(range(256)) * 5000  # crosses several reads
    dump.write_bytes(content)
    session = FakeSession(
        ("POST", f"{IMPORTS}/uploads", ok({"upload": upload()}, 201)),
        ("POST", STORAGE, FakeResponse(204, raw_text="")),
        ("POST", IMPORTS, ok({"job": job()}, 202)),
    )
    outputs = Outputs(session)
    assert run(["import", *COMMON, "--file", str(dump)], outputs.io) == Exit.OK
    _, posted, started = session.calls
    # Storage gets the form, not the API key; the length is known up front (no chunked body).
    assert "Authorization" not in posted.headers
    assert int(posted.headers["Content-Length"]) == len(posted.body)
    assert form_parts(posted) == [
        ("key", FORM_KEY.encode()),
        ("policy", b"cG9saWN5"),
        ("x-amz-signature", b"c2lnbmF0dXJl"),
        ("file", content),
    ]
    assert started.kwargs["json"] == {"confirm": True, "recreate": False, "upload_key": FORM_KEY}
    assert "uploading app.dump (1.2 MiB)" in outputs.err
    assert "uploaded app.dump in 0s" in outputs.err
    assert "c2lnbmF0dXJl" not in outputs.out + outputs.err  # the form is a credential


def test_a_dump_bigger_than_the_project_may_store_is_refused_before_uploading(tmp_path):
    dump = tmp_path / "big.dump"
    dump.write_bytes(b"x" * 2048)
    session = FakeSession(("POST", f"{IMPORTS}/uploads", ok({"upload": upload(max_bytes=1024)}, 201)))
    outputs = Outputs(session)
    assert run(["import", *COMMON, "--file", str(dump)], outputs.io) == Exit.REFUSED
    assert "is 2,048 bytes, more than the 1,024 bytes the project may store" in outputs.err
    assert len(session.calls) == 1


def test_storage_refusing_the_upload_says_why(tmp_path):
    dump = tmp_path / "app.dump"
    dump.write_bytes(b"PGDMP")
    refusal = (
        "<?xml version='1.0'?><Error><Code>AccessDenied</Code>"
        "<Message>Invalid according to Policy: Policy expired.</Message></Error>"
    )
    session = FakeSession(
        ("POST", f"{IMPORTS}/uploads", ok({"upload": upload()}, 201)),
        ("POST", STORAGE, FakeResponse(403, raw_text=refusal)),
    )
    outputs = Outputs(session)
    assert run(["import", *COMMON, "--file", str(dump)], outputs.io) == Exit.REFUSED
    assert (
        "object storage refused the upload (403: AccessDenied: Invalid according to Policy: Policy expired.); "
        "the upload form expired: run the command again for a new one"
    ) in outputs.err


def test_preflight_of_a_file_uploads_it_and_says_how_to_import_it(tmp_path):
    dump = tmp_path / "app.sql"
    dump.write_bytes(b"CREATE TABLE t (id int);\n")
    preflight = {
        "checks": [{"name": "source_version_compatible", "status": "pass", "detail": "ok"}],
        "ok": True,
    }
    session = FakeSession(
        ("POST", f"{IMPORTS}/uploads", ok({"upload": upload()}, 201)),
        ("POST", STORAGE, FakeResponse(204, raw_text="")),
        ("POST", f"{IMPORTS}/preflight", ok({"preflight": preflight})),
    )
    outputs = Outputs(session)
    assert run(["preflight", *COMMON, "--file", str(dump)], outputs.io) == Exit.OK
    assert session.calls[2].kwargs["json"] == {"recreate": False, "upload_key": FORM_KEY}
    assert f"capydb-import import --project {PROJECT} --upload-key {FORM_KEY}" in outputs.out


def test_upload_prints_the_key_only(tmp_path):
    dump = tmp_path / "app.dump"
    dump.write_bytes(b"PGDMP")
    session = FakeSession(
        ("POST", f"{IMPORTS}/uploads", ok({"upload": upload()}, 201)),
        ("POST", STORAGE, FakeResponse(204, raw_text="")),
    )
    outputs = Outputs(session)
    assert run(["upload", *COMMON, "--file", str(dump)], outputs.io) == Exit.OK
    assert outputs.out == FORM_KEY + "\n"


def test_progress_of_an_upload_stage_shows_its_bytes():
    fetching = job(
        "running",
        stage="fetch",
        progress={
            "stage": "fetch",
            "phase": "downloading the upload",
            "bytes_done": 512,
            "bytes_total": 2048,
        },
    )
    assert progress_line(fetching) == "fetch: downloading the upload · 512 B of 2.0 KiB (25%)"
    restoring = job("running", stage="restore", progress={"phase": "restoring", "tables_total": 21})
    assert progress_line(restoring) == "restore: restoring · 21 tables"


def test_the_report_of_a_dump_sorts_tables_and_does_not_compare_object_counts():
    from rich.console import Console

    from client.render import report_tables

    report = {
        "tables": {
            "public.film": {"source_rows": 10, "target_rows": 10},
            "public.actor[old]": {"source_rows": 2, "target_rows": 1},
        },
        "table_count": 2,
        "row_count": 12,
        "objects": {"indexes": {"source": 34, "target": 56}},
        "objects_source": "dump table of contents",
        "extensions": {"plpgsql": {"source": None, "target": "1.0"}},
    }
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(report_tables(report))
    lines = console.export_text().splitlines()
    rows = [line for line in lines if "public." in line]
    assert [row.split()[1] for row in rows] == ["public.actor[old]", "public.film"]  # text, not markup
    assert "differs" in rows[0] and "ok" in rows[1]
    assert "differs" not in next(line for line in lines if "indexes" in line)
    assert "differs" not in next(line for line in lines if "plpgsql" in line)
