"""Plain SQL streamed into psql through a named pipe (stages.tools.restore.restore_plain_stream)
and read from object storage in ranged pieces (stages.storage.ObjectStore.chunks)."""

from __future__ import annotations

import gzip
import os
import secrets
import shutil

import pytest

from stages import storage
from stages.connections.pgurl import SourceURL
from stages.errors import ObjectChanged, PermanentCommandFailure, PermanentError
from stages.tools.commands import PgTools
from stages.tools.restore import restore_plain_stream
from tests.support import pg


def tools() -> PgTools:
    return PgTools(os.path.dirname(shutil.which("psql")))


def test_a_streamed_script_is_run_whole_and_its_pipe_removed(scratch_db, tmp_path):
    target = scratch_db("capytgt_stream")
    rows = b"".join(b"%d\n" % n for n in range(50_000))
    restore_plain_stream(
        tools(),
        SourceURL.parse(pg.url_for(target, sslmode="disable")),
        lambda out: out.write(b"CREATE TABLE t (id int);\nCOPY t (id) FROM stdin;\n" + rows + b"\\.\n"),
        str(tmp_path),
    )
    assert pg.row_counts(target) == {"public.t": 50_000}
    assert list(tmp_path.iterdir()) == []


def test_a_failing_statement_names_the_line_and_stops_the_feed(scratch_db, tmp_path):
    target = scratch_db("capytgt_stream")
    fed = []

    def feed(out):
        out.write(b"CREATE TABLE a (id int);\n\nSELECT nope FROM a;\n")
        for _ in range(1000):  # psql has stopped: writing more fails, quietly
            out.write(b"-- " + b"x" * 65536 + b"\n")
        fed.append("all")

    with pytest.raises(PermanentCommandFailure) as caught:
        restore_plain_stream(
            tools(), SourceURL.parse(pg.url_for(target, sslmode="disable")), feed, str(tmp_path)
        )
    assert 'column "nope" does not exist' in caught.value.message
    assert "line 3 of your dump" in caught.value.message
    assert fed == [] and list(tmp_path.iterdir()) == []


def test_a_feed_that_fails_stops_psql_before_a_statement_cut_short_runs(scratch_db, tmp_path):
    """psql runs what its input holds at its end even without a semicolon: a script
    refused once read whole must never reach that end."""
    target = scratch_db("capytgt_stream")

    def feed(out):
        out.write(b"CREATE TABLE a (id int);\nCREATE TABLE b (id int)")
        out.flush()
        raise PermanentError("the dump is cut short")

    with pytest.raises(PermanentError, match="cut short"):
        restore_plain_stream(
            tools(), SourceURL.parse(pg.url_for(target, sslmode="disable")), feed, str(tmp_path)
        )
    assert "public.b" not in pg.row_counts(target)
    assert list(tmp_path.iterdir()) == []


def test_an_object_is_read_in_ranges_through_gzip(store, monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "RANGE_BYTES", 3 * storage.CHUNK_BYTES + 17)
    data = os.urandom(10 * storage.CHUNK_BYTES + 5)
    path = tmp_path / "data.gz"
    path.write_bytes(gzip.compress(data, compresslevel=1))
    key = f"imports/prj_test/{secrets.token_hex(8)}/dump"
    store.put_file(key, path)
    try:
        expected = store.stat(key)
        assert b"".join(store.chunks(key, expected=expected)) == path.read_bytes()
        with store.reader(key, expected=expected) as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            assert unzipped.read() == data
        store.put_file(key, _other(tmp_path))
        with pytest.raises(ObjectChanged, match="was replaced while the import was running"):
            b"".join(store.chunks(key, expected=expected))
    finally:
        store.delete(key)


def _other(tmp_path):
    other = tmp_path / "other"
    other.write_bytes(b"another file")
    return other
