"""Hostile review of fetch reading only the head of a custom archive (7e75da7): uploads
cut, damaged, replaced or too large, through the real in-process pipeline (preflight,
fetch, restore, finalize). The live database never changes, the error is clear, the
stages leave nothing on disk, the preview is dropped; a good archive imports whole."""

from __future__ import annotations

import os
import subprocess

import pytest

from pipeline.models import Project
from stages.dumps.archivetoc import OFFSET_SET, Reader, read_entries, read_header
from tests.support import pg
from tests.support.imports import create_upload, import_upload, upload_and_import
from tests.support.uploading import UploadReads, upload_file
from tests.support.world import make_world

ROWS = """
CREATE TABLE big (id int PRIMARY KEY, body text);
INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 20000) g;
CREATE TABLE small (id int PRIMARY KEY, note text);
INSERT INTO small SELECT g, 'n' || g FROM generate_series(1, 100) g;
CREATE INDEX small_note ON small (note);
"""
HEAD = 64 * 1024


def dump(dbname: str, path, *options: str, piped: bool = False) -> bytes:
    args = ["pg_dump", *options, "-d", pg.url_for(dbname)]
    if piped:
        path.write_bytes(subprocess.run(args, check=True, capture_output=True).stdout)
    else:
        subprocess.run([*args, f"--file={path}"], check=True, capture_output=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def source():
    name = pg.create_db(pg.scratch_name("capysrc_hhead"))
    pg.psql(name, text=ROWS)
    yield name
    pg.drop_db(name)


@pytest.fixture(scope="module")
def custom(source, tmp_path_factory) -> bytes:
    return dump(source, tmp_path_factory.mktemp("d") / "dump", "--format=custom")


def toc_end(data: bytes, tmp_path) -> int:
    path = tmp_path / "toc"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        reader = Reader(fh, len(data))
        read_entries(reader, read_header(reader)[0], custom=True)
        return fh.tell()


def _keep(world) -> str:
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    return live


def _left_on_disk(settings, job) -> list[str]:
    folder = os.path.join(settings.work_dir, job.id)
    if not os.path.exists(folder):
        return []
    return [os.path.join(root, f) for root, _dirs, files in os.walk(folder) for f in files]


def _refused(settings, job, live, before, *, text: str) -> None:
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert text in job.error, job.error
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
    if job.preview_database_id is not None:
        assert not pg.database_exists(job.preview_database_id)
    assert _left_on_disk(settings, job) == []


@pytest.mark.parametrize("where", ["toc+1", "toc+100", "inside-last-block", "one-short"])
def test_a_custom_archive_cut_after_its_toc_with_the_head_path_is_refused(
    control_db, store, custom, tmp_path, where
):
    end = toc_end(custom, tmp_path)
    assert end < HEAD < len(custom)
    length = {
        "toc+1": end + 1,
        "toc+100": end + 100,
        "inside-last-block": len(custom) - 200,
        "one-short": len(custom) - 1,
    }[where]
    if length <= HEAD:  # the head path needs an upload larger than the head
        length = HEAD + 1
    settings = control_db.replace(preflight_head_bytes=HEAD)
    world = make_world(control_db)
    live = _keep(world)
    before = pg.schema_dump(live)
    job = upload_and_import(settings, store, world, custom[:length], recreate=True)
    _refused(settings, job, live, before, text="is incomplete")


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_a_toc_ending_at_the_head_boundary_imports_whole(
    control_db, store, custom, source, tmp_path, monkeypatch, delta
):
    """The head ends one byte inside the TOC, exactly at its end, one byte after it."""
    end = toc_end(custom, tmp_path)
    head = end + delta
    reads = UploadReads(monkeypatch)
    world = make_world(control_db)
    job = upload_and_import(control_db.replace(preflight_head_bytes=head), store, world, custom)
    assert job.state == "completed", job.error
    assert reads.seen.count("download") == (2 if delta < 0 else 1), reads.seen
    live = world.project.database_name
    assert pg.row_counts(live) == pg.row_counts(source)
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert job.facts.report["tables"]["public.big"]["source_rows"] == 20000
    assert _left_on_disk(control_db, job) == []


def _uploaded(control_db, store, data: bytes):
    """A project whose live database holds `keep` (two rows), and `data` posted to a new
    upload of it: the settings (a head of HEAD bytes), the world, the live database, its
    schema, the upload's form."""
    settings = control_db.replace(preflight_head_bytes=HEAD)
    world = make_world(control_db)
    live = _keep(world)
    before = pg.schema_dump(live)
    form = create_upload(store, world)
    upload_file(form, data)
    return settings, world, live, before, form


def test_an_upload_reposted_between_fetch_and_restore_fails_cleanly(
    control_db, store, custom, source, tmp_path, monkeypatch
):
    """Fetch read only the head; the upload is posted again (another, good archive of
    the same size) before restore: restore must not restore what fetch never saw."""
    import pipeline.steps.upload as upload_steps

    other = bytearray(custom)
    # Same head (TOC), other bytes in the last data block: the TOC says nothing changed.
    other[-300] = other[-300] ^ 0xFF
    settings, world, live, before, form = _uploaded(control_db, store, custom)
    fetch = upload_steps.fetch_upload

    def fetch_then_repost(*args, **kwargs):
        result = fetch(*args, **kwargs)
        upload_file(form, bytes(other))
        return result

    monkeypatch.setattr(upload_steps, "fetch_upload", fetch_then_repost)
    job = import_upload(settings, world, form["object_key"], recreate=True)
    _refused(settings, job, live, before, text="was replaced while the import was running")


@pytest.mark.parametrize("when", ["before-import", "after-preflight"])
def test_an_archive_larger_than_the_storage_limit_is_refused_before_any_download(
    control_db, store, custom, monkeypatch, when
):
    """Preflight refuses it; a limit lowered after preflight is fetch's (check_limit
    before the head or a download)."""
    import pipeline.steps.upload as upload_steps

    reads = UploadReads(monkeypatch)
    settings, world, live, before, form = _uploaded(control_db, store, custom)

    def lower() -> None:
        Project.update(storage_limit_bytes=len(custom) - 1).where(Project.id == world.project.id).execute()

    if when == "before-import":
        lower()
    else:
        fetch = upload_steps.fetch_upload

        def lowered_then_fetch(*args, **kwargs):
            lower()
            return fetch(*args, **kwargs)

        monkeypatch.setattr(upload_steps, "fetch_upload", lowered_then_fetch)
    job = import_upload(settings, world, form["object_key"], recreate=True)
    text = "storage limit" if when == "before-import" else "allowed for this import"
    _refused(settings, job, live, before, text=text)
    assert "download" not in reads.seen, reads.seen


def test_a_damaged_toc_in_the_head_is_refused_clearly(control_db, store, custom, tmp_path):
    """A byte of an entry's tag (inside the TOC) turned into a huge length prefix."""
    end = toc_end(custom, tmp_path)
    data = bytearray(custom)
    # The TOC's last bytes are the last entry's offset/dependency fields; clobber a
    # run in its middle so a length there claims gigabytes.
    middle = end // 2
    data[middle : middle + 5] = b"\x00\xff\xff\xff\x7f"
    settings = control_db.replace(preflight_head_bytes=HEAD)
    world = make_world(control_db)
    live = _keep(world)
    before = pg.schema_dump(live)
    job = upload_and_import(settings, store, world, bytes(data), recreate=True)
    assert job.state == "failed", job.error
    assert job.error and len(job.error) < 2000, job.error
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
    if job.preview_database_id is not None:
        assert not pg.database_exists(job.preview_database_id)
    assert _left_on_disk(settings, job) == []


def test_a_huge_chunk_length_in_the_last_block_is_refused_in_restore(control_db, store, tmp_path, scratch_db):
    """An uncompressed archive whose last data block's first chunk claims 2 GiB."""
    src = scratch_db("capysrc_hhuge")
    pg.psql(
        src,
        text="CREATE TABLE a (id int, body text); "
        "INSERT INTO a SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 5000) g; "
        "CREATE TABLE z (id int); INSERT INTO z SELECT generate_series(1, 50);",
    )
    data = bytearray(dump(src, tmp_path / "dump", "--format=custom", "--compress=0"))
    path = tmp_path / "dump"
    with open(path, "rb") as fh:
        reader = Reader(fh, len(data))
        version, _fmt, _c = read_header(reader)
        entries = read_entries(reader, version, custom=True)
        int_size = reader.int_size
    last = max(e.offset for e in entries if e.offset_flag == OFFSET_SET)
    assert last > HEAD
    chunk_length_at = last + 1 + (1 + int_size)  # block type, dump id, then the first chunk's length
    data[chunk_length_at : chunk_length_at + 1 + int_size] = b"\x00" + (2**31 - 1).to_bytes(
        int_size, "little"
    )
    settings = control_db.replace(preflight_head_bytes=HEAD)
    world = make_world(control_db)
    live = _keep(world)
    before = pg.schema_dump(live)
    job = upload_and_import(settings, store, world, bytes(data), recreate=True)
    _refused(settings, job, live, before, text="is incomplete")


@pytest.mark.parametrize("kind", ["piped", "tar", "compress0"])
def test_other_good_archives_import_exactly(control_db, store, source, tmp_path, kind):
    options = {
        "piped": ("--format=custom",),
        "tar": ("--format=tar",),
        "compress0": ("--format=custom", "--compress=0"),
    }[kind]
    data = dump(source, tmp_path / "dump", *options, piped=kind == "piped")
    assert len(data) > HEAD
    world = make_world(control_db)
    job = upload_and_import(control_db.replace(preflight_head_bytes=HEAD), store, world, data)
    assert job.state == "completed", job.error
    live = world.project.database_name
    assert pg.row_counts(live) == pg.row_counts(source)
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert _left_on_disk(control_db, job) == []


@pytest.mark.parametrize("fraction", [0.5, 0.9999])
def test_a_piped_custom_archive_cut_is_refused_with_the_head_path(
    control_db, store, source, tmp_path, fraction
):
    data = dump(source, tmp_path / "dump", "--format=custom", piped=True)
    settings = control_db.replace(preflight_head_bytes=HEAD)
    world = make_world(control_db)
    live = _keep(world)
    before = pg.schema_dump(live)
    job = upload_and_import(settings, store, world, data[: int(len(data) * fraction)], recreate=True)
    _refused(settings, job, live, before, text="is incomplete")
