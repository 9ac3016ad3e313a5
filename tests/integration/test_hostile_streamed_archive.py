"""Hostile review of restoring a custom archive while it downloads (069f19a): crafted
tables of contents whose offsets lie, downloads that stall, fail or are cancelled while
lanes wait for bytes, archives cut short. Through the real in-process pipeline."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from pipeline import cancellation
from pipeline.import_steps import ImportSteps
from pipeline.models import Job
from pipeline.sealing import Sealer
from stages.dumps.archivetoc import NO_DATA, OFFSET_SET, Reader, read_header, read_toc
from stages.errors import Cancelled, StorageUnavailable
from tests.integration.test_upload_restore_overlap import HeldDownload, _preview_rows
from tests.support import pg
from tests.support.imports import upload_and_import
from tests.support.world import make_world

HEAD = 64 * 1024
ROWS = """
CREATE TABLE aaa_overlap_first (id int PRIMARY KEY, body text);
INSERT INTO aaa_overlap_first SELECT g, md5(g::text) FROM generate_series(1, 30000) g;
CREATE TABLE zzz_overlap_last (id int PRIMARY KEY, body text);
INSERT INTO zzz_overlap_last
SELECT g, (SELECT string_agg(md5(g::text || '.' || i::text), '') FROM generate_series(1, 20) i)
FROM generate_series(1, 20000) g;
"""
FIRST = "aaa_overlap_first"


@pytest.fixture(scope="module")
def source():
    name = pg.create_db(pg.scratch_name("capysrc_hstream"))
    pg.psql(name, text=ROWS)
    yield name
    pg.drop_db(name)


@pytest.fixture(scope="module")
def custom(source, tmp_path_factory) -> bytes:
    path = pg.dump_with(source, tmp_path_factory.mktemp("hs") / "dump", "--format=custom")
    return path.read_bytes()


def _positions(data: bytes, tmp_path) -> dict[int, int]:
    """Each TOC entry's dump id -> byte where its offset flag lies (ReadToc walk)."""
    path = tmp_path / "walk"
    path.write_bytes(data)
    found: dict[int, int] = {}
    with open(path, "rb") as fh:
        reader = Reader(fh, len(data))
        version, _fmt, _c = read_header(reader)
        count = reader.integer()
        for _ in range(count):
            dump_id = reader.integer()
            reader.integer()
            reader.string()
            reader.string()
            reader.string()
            reader.string()
            reader.integer()
            reader.string()
            reader.string()
            reader.string()
            reader.string()
            reader.string()
            if version >= (1, 14, 0):
                reader.string()
            if version >= (1, 16, 0):
                reader.integer()
            reader.string()
            reader.string()
            while reader.string() is not None:
                pass
            found[dump_id] = fh.tell()
            reader.byte()
            reader.take(reader.off_size)
    return found


def _int(value: int) -> bytes:
    return b"\x00" + value.to_bytes(4, "little")


def _keep(world) -> tuple[str, str]:
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    return live, pg.schema_dump(live)


def _left_on_disk(settings, job) -> list[str]:
    folder = os.path.join(settings.work_dir, job.id)
    if not os.path.exists(folder):
        return []
    return [os.path.join(root, f) for root, _dirs, files in os.walk(folder) for f in files]


def _unchanged(settings, job, live, before) -> None:
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
    if job.preview_database_id is not None:
        assert not pg.database_exists(job.preview_database_id)
    assert _left_on_disk(settings, job) == []


def _lying_archive(custom: bytes, tmp_path) -> tuple[bytes, int]:
    """A non-data entry (the last table's TABLE entry) given a data offset one byte
    into the first table's data block, and a tiny block of its own appended at the end
    (so the completeness walk finds every entry's block). pg_restore never reads that
    entry's data (it has no dumper): restored whole, the archive imports exactly. But
    the first table's "end" (next offset) now lies one byte into its block."""
    contents = read_toc_bytes(custom, tmp_path)
    first = next(e for e in contents.entries if e.desc == "TABLE DATA" and e.tag == FIRST.encode())
    liar = next(e for e in contents.entries if e.desc == "TABLE" and e.tag == b"zzz_overlap_last")
    assert liar.offset_flag == NO_DATA
    where = _positions(custom, tmp_path)[liar.dump_id]
    data = bytearray(custom)
    data[where] = OFFSET_SET
    data[where + 1 : where + 9] = (first.offset + 1).to_bytes(8, "little")
    data += b"\x01" + _int(liar.dump_id) + _int(0)
    return bytes(data), first.offset


def read_toc_bytes(data: bytes, tmp_path):
    path = tmp_path / "toc"
    path.write_bytes(data)
    return read_toc(str(path))


def test_the_lying_archive_is_accepted_whole(control_db, store, source, custom, tmp_path):
    """Control: with the whole file on disk before pg_restore reads it (the head
    setting large, fetch downloads it), the crafted archive imports exactly."""
    data, _start = _lying_archive(custom, tmp_path)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, data)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert pg.row_counts(world.project.database_name) == pg.row_counts(source)


def test_an_offset_that_lies_inside_a_block_never_makes_pg_restore_read_past_the_download(
    control_db, store, source, custom, tmp_path, monkeypatch
):
    """The first table's rows are read once the bytes up to the next offset (any
    entry's) are on disk; a lying offset one byte into its block must not let
    pg_restore start on a block not yet there (it fails reading 'end of file'). The
    same bytes import when whole (test above): streaming must not change the outcome,
    or at least fail with a clear, deterministic error about the archive."""
    data, start = _lying_archive(custom, tmp_path)

    def pause(_held: HeldDownload) -> None:
        time.sleep(6)

    HeldDownload(monkeypatch, max(start + 64, (64 << 10) + 4096), pause)
    world = make_world(control_db)
    live, before = _keep(world)
    settings = control_db.replace(preflight_head_bytes=HEAD)
    job = upload_and_import(settings, store, world, data, recreate=True)
    if job.state != "completed":
        _unchanged(settings, job, live, before)
    assert "end of file" not in (job.error or ""), (job.error, job.last_stderr)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert pg.row_counts(live) == pg.row_counts(source)


@pytest.mark.parametrize("where", ["toc+1", "first-block", "last-block", "one-short"])
def test_an_archive_cut_short_while_streamed_is_refused_and_changes_nothing(
    control_db, store, source, custom, tmp_path, where
):
    contents = read_toc_bytes(custom, tmp_path)
    first = next(e for e in contents.entries if e.desc == "TABLE DATA" and e.tag == FIRST.encode())
    length = {
        "toc+1": min(e.offset for e in contents.entries if e.offset_flag == OFFSET_SET) + 1,
        "first-block": first.offset + contents.data_bytes[first.dump_id] // 2,
        "last-block": len(custom) - 5000,
        "one-short": len(custom) - 1,
    }[where]
    length = max(length, HEAD + 1)
    settings = control_db.replace(preflight_head_bytes=HEAD)
    world = make_world(control_db)
    live, before = _keep(world)
    job = upload_and_import(settings, store, world, custom[:length], recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "is incomplete" in job.error, job.error
    _unchanged(settings, job, live, before)


def test_a_download_that_stalls_transiently_while_lanes_wait_ends_cleanly(
    control_db, store, source, custom, tmp_path, monkeypatch
):
    """Storage stops answering after the first table's rows: lanes waiting for the
    rest must be released at once with the transient error; nothing swapped."""
    contents = read_toc_bytes(custom, tmp_path)
    first = next(e for e in contents.entries if e.desc == "TABLE DATA" and e.tag == FIRST.encode())
    end = first.offset + contents.data_bytes[first.dump_id]

    def fail(_held: HeldDownload) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _preview_rows():
            time.sleep(0.05)
        raise StorageUnavailable("object storage does not answer")

    HeldDownload(monkeypatch, end, fail)
    world = make_world(control_db)
    live, before = _keep(world)
    settings = control_db.replace(preflight_head_bytes=HEAD)
    began = time.monotonic()
    job = upload_and_import(settings, store, world, custom, recreate=True)
    assert time.monotonic() - began < 120
    assert job.state in ("failed", "pending", "retrying") or job.state != "completed", job.state
    assert "does not answer" in (job.error or job.last_stderr or ""), (job.state, job.error)
    assert "Traceback" not in (job.error or "")
    _unchanged(settings, job, live, before)


def test_cancelling_while_lanes_wait_for_bytes_stops_promptly(
    control_db, store, source, custom, tmp_path, monkeypatch
):
    contents = read_toc_bytes(custom, tmp_path)
    first = next(e for e in contents.entries if e.desc == "TABLE DATA" and e.tag == FIRST.encode())
    end = first.offset + contents.data_bytes[first.dump_id]
    world = make_world(control_db)
    live, before = _keep(world)
    settings = control_db.replace(preflight_head_bytes=HEAD)
    timing: dict[str, float] = {}

    def cancel_then_stall(_held: HeldDownload) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _preview_rows():
            time.sleep(0.05)
        job = Job.select().where(Job.project_id == world.project.id).order_by(Job.created_at.desc()).get()
        helper = ImportSteps(settings, Sealer(settings.secret_key), store)
        timing["cancelled"] = time.monotonic()
        cancellation.request_cancel(
            job.id,
            "operator:tester",
            lease=__import__("datetime").timedelta(seconds=90),
            cleanup=lambda j: helper.cleanup(j, succeeded=False),
        )
        time.sleep(1)  # storage is slow; the next chunk sees the stop

    HeldDownload(monkeypatch, end, cancel_then_stall)
    job = upload_and_import(settings, store, world, custom, recreate=True)
    finished = time.monotonic()
    assert "cancelled" in timing
    assert finished - timing["cancelled"] < 20
    assert job.state == "cancelled", (job.state, job.error)
    _unchanged(settings, job, live, before)
    assert [t.name for t in threading.enumerate() if t.name == "download-upload"] == []


VARIANTS_SQL = """
CREATE TABLE aaa_overlap_first (id int PRIMARY KEY, body text);
INSERT INTO aaa_overlap_first SELECT g, md5(g::text) FROM generate_series(1, 30000) g;
CREATE TABLE zzz_overlap_last (id int PRIMARY KEY, body text);
INSERT INTO zzz_overlap_last SELECT g, repeat(md5(g::text), 10) FROM generate_series(1, 5000) g;
CREATE SEQUENCE s_var; SELECT setval('s_var', 42);
SELECT lo_from_bytea(0, convert_to(repeat('lo', 50000), 'UTF8'));
"""


@pytest.fixture(scope="module")
def variants_source():
    name = pg.create_db(pg.scratch_name("capysrc_hsvar"))
    pg.psql(name, text=VARIANTS_SQL)
    pg.psql(
        name,
        text="".join(
            f"CREATE TABLE small_{i:03d} (id int PRIMARY KEY, v text); INSERT INTO small_{i:03d} VALUES (1, 'x{i}');\n"
            for i in range(250)
        ),
    )
    yield name
    pg.drop_db(name)


@pytest.mark.parametrize(
    "options,piped",
    [
        (("--format=custom",), False),
        (("--format=custom", "--compress=0"), False),
        (("--format=custom", "--inserts"), False),
        (("--format=custom",), True),
    ],
    ids=["plain-custom", "compress0", "inserts", "piped-no-offsets"],
)
def test_archive_variants_import_exactly_while_streamed(
    control_db, store, variants_source, tmp_path, monkeypatch, options, piped
):
    import subprocess

    args = ["pg_dump", *options, "-d", pg.url_for(variants_source)]
    if piped:
        data = subprocess.run(args, check=True, capture_output=True).stdout
    else:
        subprocess.run([*args, f"--file={tmp_path / 'd'}"], check=True, capture_output=True)
        data = (tmp_path / "d").read_bytes()
    assert len(data) > 3 * HEAD
    HeldDownload(monkeypatch, len(data) // 2, lambda _h: time.sleep(1.5))
    world = make_world(control_db)
    job = upload_and_import(control_db.replace(preflight_head_bytes=HEAD), store, world, data)
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert pg.row_counts(live) == pg.row_counts(variants_source)
    assert pg.admin("SELECT count(*) FROM pg_largeobject_metadata", dbname=live) == [(1,)]
    assert pg.admin("SELECT last_value FROM s_var", dbname=live) == [(42,)]
    assert _left_on_disk(control_db, job) == []


def test_a_download_abandoned_at_its_last_chunk_is_not_reported_whole(tmp_path):
    """ObjectStore.download(in_place=True): `progress` counts the last chunk (written ==
    total), then raises Cancelled as the download was abandoned meanwhile, and the
    download removes the file it wrote. wait_for(None) / wait() must then not say the
    archive is on disk whole (the restore would run pg_restore / check_complete on a
    file that is gone)."""
    from pipeline.steps.upload import _Download
    from stages.storage import ObjectStore, StoredObject

    pieces = [b"a" * 10, b"b" * 20, b"c" * 30]
    total = sum(map(len, pieces))
    holder: dict[str, Any] = {}
    release = threading.Event()

    class FakeStore:
        def chunks(self, key, *, expected=None, max_bytes=None, on_progress=None):
            done = 0
            for number, piece in enumerate(pieces):
                yield piece
                done += len(piece)
                if number == len(pieces) - 1:
                    assert release.wait(10)
                    holder["download"].abandon()  # the engine's interrupt, or a cancel
                on_progress(done, total)

        def download(self, key, path, **kwargs):
            return ObjectStore.download(self, key, path, **kwargs)  # type: ignore[arg-type]

    download = _Download.__new__(_Download)
    holder["download"] = download
    download.__init__(FakeStore(), StoredObject("k", total, None, "etag"), str(tmp_path / "upload"), 10**9)  # type: ignore[arg-type, misc]
    release.set()
    download._thread.join(10)
    assert not download.complete
    assert not os.path.exists(download.path)
    with pytest.raises(Cancelled):
        download.wait_for(None)  # not "on disk whole": the file was removed


def _cancel_job(settings, store, world) -> None:
    import datetime as dt

    job = Job.select().where(Job.project_id == world.project.id).order_by(Job.created_at.desc()).get()
    helper = ImportSteps(settings, Sealer(settings.secret_key), store)
    cancellation.request_cancel(
        job.id,
        "operator:tester",
        lease=dt.timedelta(seconds=90),
        cleanup=lambda j: helper.cleanup(j, succeeded=False),
    )


@pytest.mark.parametrize("how", ["cancel", "replaced", "storage-down"])
def test_a_download_ending_before_the_toc_is_whole_ends_the_stage_cleanly(
    control_db, store, source, custom, monkeypatch, how
):
    """Fetch read the head; the restore's download stops 100 bytes in, while the stage
    waits for the table of contents."""
    from stages.errors import ObjectChanged

    world = make_world(control_db)
    live, before = _keep(world)
    settings = control_db.replace(preflight_head_bytes=HEAD)

    def then(_held: HeldDownload) -> None:
        if how == "cancel":
            _cancel_job(settings, store, world)
            time.sleep(1)
        elif how == "replaced":
            raise ObjectChanged("the upload was replaced while it was read; upload it again")
        else:
            raise StorageUnavailable("object storage does not answer")

    HeldDownload(monkeypatch, 100, then)
    began = time.monotonic()
    job = upload_and_import(settings, store, world, custom, recreate=True)
    assert time.monotonic() - began < 60
    expected = {"cancel": "cancelled", "replaced": "failed", "storage-down": None}[how]
    if expected:
        assert job.state == expected, (job.state, job.error)
    assert job.state != "completed"
    assert "Traceback" not in (job.error or "")
    _unchanged(settings, job, live, before)
