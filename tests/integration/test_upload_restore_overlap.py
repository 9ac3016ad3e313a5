"""A custom archive is restored while it downloads (pipeline.steps.upload): its schema
once its table of contents is on disk, each table's rows once the bytes up to the end of
its data block are; and the whole archive is still walked for completeness before the
stage ends. Through the real in-process pipeline and object storage, with the restore
stage's download held at a chosen byte."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stages.dumps.archivetoc import read_toc
from stages.errors import ObjectChanged
from stages.storage import ObjectStore
from tests.support import pg
from tests.support.imports import upload_and_import
from tests.support.world import make_world

# pg_dump writes table data by name: the first table's rows lie first in the archive.
# The last one's compress little, so that it is read by a pg_restore of its own
# (stages.copy.archive.BATCH_BYTES), not batched with the first.
ROWS = """
CREATE TABLE aaa_overlap_first (id int PRIMARY KEY, body text);
INSERT INTO aaa_overlap_first SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
CREATE TABLE zzz_overlap_last (id int PRIMARY KEY, body text);
INSERT INTO zzz_overlap_last
SELECT g, (SELECT string_agg(md5(g::text || '.' || i::text), '') FROM generate_series(1, 20) i)
FROM generate_series(1, 20000) g;
CREATE INDEX zzz_overlap_body ON zzz_overlap_last (body);
"""
FIRST = "aaa_overlap_first"
RESTORE_THREAD = "download-upload"  # the restore stage's download (pipeline.steps.upload)


@pytest.fixture(scope="module")
def source():
    name = pg.create_db(pg.scratch_name("capysrc_overlap"))
    pg.psql(name, text=ROWS)
    yield name
    pg.drop_db(name)


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory) -> tuple[bytes, int]:
    """The source as a custom archive, and the byte where the first table's rows end."""
    path = pg.dump_with(source, tmp_path_factory.mktemp("overlap") / "dump", "--format=custom")
    contents = read_toc(str(path))
    first = next(e for e in contents.entries if e.desc == "TABLE DATA" and e.tag == FIRST.encode())
    end = first.offset + contents.data_bytes[first.dump_id]
    assert end < len(path.read_bytes()) - 100_000, "the last table's rows must come well after the first's"
    return path.read_bytes(), end


def _preview_rows() -> int:
    """The first table's rows in any preview of the cluster (0 while none has them)."""
    for (name,) in pg.admin(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", ("capy_preview_",)
    ):
        try:
            found = pg.admin(f"SELECT count(*) FROM {FIRST}", dbname=name)
        except Exception:  # noqa: BLE001 - not created yet, or dropped meanwhile
            continue
        if found and found[0][0]:
            return int(found[0][0])
    return 0


class HeldDownload:
    """ObjectStore.chunks patched so that the restore stage's download stops at byte
    `at` (its pieces still counted by `on_progress`), then `then(self)` runs in the
    download's thread before the rest comes: it may wait, or raise."""

    def __init__(self, monkeypatch: Any, at: int, then: Any) -> None:
        self.at, self.then = at, then
        self.held = threading.Event()
        chunks = ObjectStore.chunks

        def held(store: ObjectStore, key: str, **kwargs: Any) -> Iterator[bytes]:
            on_progress = kwargs.pop("on_progress", None)
            if threading.current_thread().name != RESTORE_THREAD:
                yield from chunks(store, key, on_progress=on_progress, **kwargs)
                return
            done = 0
            for chunk in chunks(store, key, **kwargs):
                pieces = [chunk]
                if done < self.at < done + len(chunk):
                    pieces = [chunk[: self.at - done], chunk[self.at - done :]]
                for piece in pieces:
                    yield piece
                    done += len(piece)
                    if on_progress is not None:
                        on_progress(done, kwargs["expected"].size)
                    if done == self.at:
                        self.held.set()
                        self.then(self)

        monkeypatch.setattr(ObjectStore, "chunks", held)


def test_the_first_tables_rows_are_restored_before_the_rest_of_the_archive_arrives(
    control_db, store, source, archive, monkeypatch
):
    data, first_end = archive
    seen: list[int] = []

    def wait_for_the_first_table(_held: HeldDownload) -> None:
        # Nothing after the first table's rows is on disk until they are in the preview.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            rows = _preview_rows()
            if rows:
                seen.append(rows)
            else:
                time.sleep(0.05)

    held = HeldDownload(monkeypatch, first_end, wait_for_the_first_table)
    world = make_world(control_db)
    job = upload_and_import(control_db.replace(preflight_head_bytes=64 * 1024), store, world, data)
    assert held.held.is_set(), "the restore's download never reached the first table's end"
    assert job.state == "completed", (job.error, job.last_stderr)
    assert seen == [3000], "the first table's rows waited for the whole archive"
    live = world.project.database_name
    assert pg.row_counts(live) == pg.row_counts(source)
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert job.facts.report["tables"]["public.zzz_overlap_last"] == {
        "source_rows": 20000,
        "target_rows": 20000,
    }


def test_a_download_that_fails_while_tables_are_restored_fails_the_import_and_changes_nothing(
    control_db, store, source, archive, monkeypatch
):
    data, first_end = archive

    def fail(_held: HeldDownload) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _preview_rows():
            time.sleep(0.05)
        raise ObjectChanged("the upload was replaced while it was read; upload it again")

    HeldDownload(monkeypatch, first_end, fail)
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    before = pg.schema_dump(live)
    job = upload_and_import(
        control_db.replace(preflight_head_bytes=64 * 1024), store, world, data, recreate=True
    )
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "the upload was replaced while it was read" in job.error, job.error
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
    assert job.preview_database_id is None or not pg.database_exists(job.preview_database_id)
    assert not os.path.exists(os.path.join(control_db.work_dir, job.id))


def test_an_archive_cut_short_fails_before_the_swap_even_when_nothing_read_the_cut(
    control_db, store, source, archive, monkeypatch
):
    """The restore reads what it needs while the archive arrives; the bytes nobody read
    (here: none, the restore is stubbed to succeed at once) are still walked whole before
    the stage ends, so an archive cut short is never swapped in."""
    import pipeline.steps.upload as upload_steps

    data, _first_end = archive
    restored: list[str] = []

    def restore_nothing(context, **kwargs):
        restored.append(kwargs["archive"])
        return {"source_counts": {}, "copied_counts": {}, "uncounted_tables": []}

    monkeypatch.setattr(upload_steps, "restore_archive_upload", restore_nothing)
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    before = pg.schema_dump(live)
    job = upload_and_import(
        control_db.replace(preflight_head_bytes=64 * 1024), store, world, data[:-200], recreate=True
    )
    assert restored, "the restore never started"
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "is incomplete" in job.error, job.error
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
