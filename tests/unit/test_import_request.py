"""The import request's canonical form: what an Idempotency-Key is compared by (the
body itself is validated by app.schemas, tests/unit/test_openapi.py)."""

from pipeline.imports import ImportRequest
from stages.connections.pgurl import SourceURL


def test_equal_requests_have_equal_canonical_forms_and_different_ones_do_not():
    live = ImportRequest(recreate=False, source=SourceURL.parse_source("postgres://u:p@db.example.com/app"))
    same = ImportRequest(recreate=False, source=SourceURL.parse_source("postgres://u:p@db.example.com/app"))
    assert live.canonical() == same.canonical()
    assert live.canonical() != ImportRequest(recreate=True, source=live.source).canonical()
    upload = ImportRequest(recreate=False, upload_key="imports/prj_x/abc/dump")
    assert upload.canonical() != live.canonical()
    assert "imports/prj_x/abc/dump" in upload.canonical()
