"""The fetch and restore stages of an uploaded dump (called by pipeline.import_steps).

No stage reads a file another stage left on local disk, so any worker, on any host,
runs any stage. What restore needs from fetch travels in the job's facts (small JSON:
the format, the upload's size and ETag, what to skip, the counts); the dump itself is
read from object storage again, pinned to the version fetch checked (a replaced upload
fails the import, see `ObjectStore.chunks`). Each stage keeps its files in a folder of
its own, `CAPY_WORK_DIR/<job id>/<stage>-<random>/`, removed when the stage ends,
whether it succeeded or not:

- fetch checks the upload. A custom archive whose head (CAPY_PREFLIGHT_HEAD_BYTES)
  holds its whole table of contents is read no further; any other archive is
  downloaded and walked for completeness (stages.dumps.archivecheck). Its table of
  contents is read (its rows are counted by restore, as they stream); plain SQL streams
  from storage through the filter (stages.dumps.plainsql), which counts its rows, and
  is never whole on disk (a large script's schema, without its data, is written for
  the whole-schema rehearsal).
- restore downloads an archive into its own folder (pg_restore needs a file it can
  seek in) and restores it on the copy engine (pipeline.steps.archive) with the plan it
  recomputes from the archive and the facts (the rehearsal's skip list). A custom
  archive is restored while it downloads (each table's rows once its data block is on
  disk) and walked for completeness before the stage ends: one cut short fails the
  stage, and its preview is never swapped in. A tar archive is downloaded and walked
  first. Plain SQL streams from storage through the same filter into psql
  (stages.tools.restore).

Local disk: an archive's size during restore (and during fetch, for a tar archive or a
custom one whose table of contents goes past the head); for plain SQL, a few small
files.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import psycopg2.extensions

from pipeline.config import Settings
from pipeline.models import Cluster, Project
from pipeline.preflights import rehearsal_setup
from pipeline.sealing import Sealer
from pipeline.steps.archive import readable_toc, restore_archive_upload
from pipeline.steps.folders import stage_folder
from pipeline.steps.results import FetchResult, SourceDescription, recorded
from stages.connections.pgurl import SourceURL
from stages.database import dbsettings
from stages.dumps import toc
from stages.dumps.archivecheck import ArchiveCutShort, check_complete, cut_short_in_head
from stages.dumps.archivetoc import ArchiveToc, End, read_toc
from stages.dumps.formats import HEAD_BYTES, detect_format
from stages.dumps.gate import check_archive_readable, check_versions
from stages.dumps.plainsql import PlainSql, filter_plain_sql
from stages.dumps.rows import RowCounter, dumped_sequences
from stages.dumps.sqlscript import ScriptError
from stages.errors import Cancelled, PermanentError
from stages.preflight.extensions import require_allowlisted
from stages.preflight.plainrehearsal import keep_schema, rehearse_plain
from stages.preflight.rehearsal import report_rehearsal, skip_map
from stages.preflight.report import Preflight
from stages.storage import ObjectStore, StoredObject, check_limit
from stages.tools.commands import PgTools
from stages.tools.restore import restore_plain_stream

if TYPE_CHECKING:
    from pipeline.import_steps import StageContext

ARCHIVES = ("custom", "tar")
# A custom archive's restore starts once its table of contents is on disk: these first
# bytes are awaited, then twice as many, until it is there whole.
TOC_BYTES = 64 << 10
# Progress while bytes stream: at most one write to the job row this often.
PROGRESS_SECONDS = 1.0


def sql_limit(project: Project) -> int:
    """Decompressed SQL may be larger than the data it loads, but not without bound."""
    return 2 * project.storage_limit_bytes


def fetch_upload(
    context: StageContext, *, settings: Settings, sealer: Sealer, store: ObjectStore, tools: PgTools
) -> FetchResult:
    """Identify the upload, prove the target's tools can read it, plan what the project
    role restores, and count its rows and sequences for finalize to compare. Leaves no
    file behind: the facts it returns are all restore needs."""
    job = context.job
    assert job.upload_key is not None
    project = Project.get_by_id(job.project_id)
    limit = project.storage_limit_bytes
    upload = store.stat(job.upload_key)
    with stage_folder(settings, job, "fetch") as folder:
        head = os.path.join(folder, "head")
        store.head(job.upload_key, head, HEAD_BYTES)
        info = detect_format(head)
        os.remove(head)
        major = Cluster.get_by_id(job.cluster_id).server_major
        check_versions(info, major)
        facts: dict[str, Any] = {
            "upload_bytes": upload.size,
            "upload_etag": upload.etag,
            "dump_format": info.format,
            "dump_info": {
                "archive_version": info.archive_version,
                "dumped_by": info.dumped_by,
                "dumped_from": info.dumped_from,
            },
        }
        counter = RowCounter()
        skipped: list[dict[str, Any]] = job.facts.rehearsal_skipped
        if info.format in ARCHIVES:
            archive, contents = _table_of_contents(
                context,
                store,
                upload,
                folder,
                info.format,
                head_bytes=settings.preflight_head_bytes,
                limit=limit,
            )
            check_archive_readable(tools, archive, info, major)
            if contents is None:
                contents = readable_toc(archive)
            facts.update(
                _archive_facts(
                    tools, archive, folder, skipped, settings.extension_allowlist, contents.encoding
                )
            )
            # The rows are counted by restore as they stream (pipeline.steps.archive);
            # the sequences' values are in the table of contents.
            counter.sequences = dumped_sequences(contents)
            kinds, basis, dump_bytes = facts.pop("toc_kinds"), "dump table of contents", upload.size
        else:
            gzipped = info.format == "gzip-plain"
            if upload.size > settings.preflight_head_bytes:  # preflight rehearsed only the head
                skipped = _rehearse_plain_schema(
                    context,
                    settings,
                    sealer,
                    store,
                    upload,
                    folder,
                    gzipped=gzipped,
                    max_bytes=sql_limit(project),
                )
            plain = _filter_upload(
                store,
                upload,
                gzipped,
                sql_limit(project),
                skipped,
                _bytes_progress(context, "counting the rows in the dump"),
                counter=counter,
                out=None,
            )
            require_allowlisted(plain.extensions, settings.extension_allowlist)
            facts.update(
                extensions=plain.extensions,
                extension_comments=plain.extension_comments,
                skipped=plain.skipped,
            )
            kinds, basis, dump_bytes = counter.kinds, "dump statements", plain.bytes
    counts, uncounted = counter.result()
    description = {
        "objects": kinds,
        "sequences": counter.sequences,
        "extensions": {name: None for name in facts["extensions"]},
    }
    return FetchResult(
        **facts,
        # What the schema rehearsal found the project cannot hold (of the whole script,
        # for a large plain one): restore leaves it out again.
        restore_skip=skipped,
        dump_bytes=dump_bytes,
        source_counts=counts,
        uncounted_tables=uncounted,
        source_description=SourceDescription.model_validate(description),
        source_basis=basis,
    )


def _table_of_contents(
    context: StageContext,
    store: ObjectStore,
    upload: StoredObject,
    folder: str,
    fmt: str,
    *,
    head_bytes: int,
    limit: int,
) -> tuple[str, ArchiveToc | None]:
    """The file fetch reads an archive's table of contents from, and that table when it
    was read here (None: the caller reads it, once pg_restore has said it can). A custom archive
    whose first `head_bytes` hold its whole table of contents is read no further:
    restore downloads it whole anyway, and walks it for completeness before anything
    is restored (`restore_upload`); what the head already proves cut short fails here.
    Any other archive is downloaded whole and walked here: a cut tar archive can make
    pg_restore loop, and its table of contents need not come first."""
    check_limit(upload.key, upload.size, limit)
    if fmt == "custom" and upload.size > head_bytes:
        head = os.path.join(folder, "head")
        store.head(upload.key, head, head_bytes, expected=upload)
        cut = cut_short_in_head(head, fmt, upload.size)
        if cut is not None:
            raise ArchiveCutShort(cut)
        try:
            return head, read_toc(head, size=upload.size)
        except (End, ValueError):
            os.remove(head)  # it goes on past the head (or is damaged: read whole, named below)
    archive = os.path.join(folder, "upload")
    store.download(
        upload.key,
        archive,
        expected=upload,
        max_bytes=limit,
        on_progress=_bytes_progress(context, "downloading the upload"),
    )
    # Before pg_restore reads it: a cut tar archive can make pg_restore loop.
    check_complete(archive, fmt)
    return archive, None


@dataclass
class RestoreFolder:
    """The restore stage's folder, and the archive downloading into it (None for plain
    SQL, which streams instead)."""

    folder: str
    download: _Download | None


class _Download:
    """An archive downloading from object storage into `path` in a thread of its own,
    beside the preview's creation and the restore (stages.copy.archive.ArchiveBytes):
    `written` bytes of it are on disk, in order, and readable by another process."""

    def __init__(self, store: ObjectStore, upload: StoredObject, path: str, max_bytes: int) -> None:
        self.path = path
        self.total = upload.size
        self.written = 0
        self._changed = threading.Condition()
        self._finished = False
        self._stop = threading.Event()
        self._failure: list[BaseException] = []

        def progress(done: int, total: int) -> None:
            if self._stop.is_set():  # before counting: a failed download's file is removed
                raise Cancelled("the restore stopped before the upload was downloaded")
            with self._changed:
                self.written = done
                self._changed.notify_all()

        def run() -> None:
            try:
                # In place, not renamed at the end: pg_restore reads the first tables'
                # rows while the last ones still arrive.
                store.download(
                    upload.key,
                    path,
                    expected=upload,
                    max_bytes=max_bytes,
                    on_progress=progress,
                    in_place=True,
                )
            except BaseException as err:  # noqa: BLE001 - raised to whoever waits, in their thread
                self._failure.append(err)
            with self._changed:
                self._finished = True
                self._changed.notify_all()

        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(run,), name="download-upload", daemon=True
        )
        self._thread.start()

    def wait_for(self, end: int | None) -> None:
        """Return once the first `end` bytes (None: all of them) are on disk; raise the
        download's error once it has failed (its file is then removed), and Cancelled
        once it was abandoned short of them."""
        needed = self.total if end is None else min(end, self.total)
        with self._changed:
            while self.written < needed and not self._finished and not self._stop.is_set():
                self._changed.wait()
            if self._failure:
                raise self._failure[0]
            if self.written < needed:
                raise Cancelled("the restore stopped before the upload was downloaded")

    def abandon(self) -> None:
        """Stop downloading (at the next chunk): the restore no longer needs the rest.
        Whoever waits for more bytes raises at once."""
        with self._changed:
            self._stop.set()
            self._changed.notify_all()

    @property
    def complete(self) -> bool:
        """Every byte is on disk (the download may not have returned yet)."""
        with self._changed:
            return not self._failure and self.written == self.total

    def wait(self, context: StageContext) -> str:
        """The archive's path once it is on disk whole, reporting the bytes meanwhile."""
        while True:
            with self._changed:
                if self._finished:
                    break
                self._changed.wait(PROGRESS_SECONDS)
            context.progress(
                {"phase": "downloading the upload", "bytes_done": self.written, "bytes_total": self.total}
            )
        self.wait_for(None)
        return self.path

    def table_of_contents(self, context: StageContext) -> ArchiveToc:
        """A custom archive's table of contents, once the bytes that hold it are here."""
        needed = TOC_BYTES
        while needed < self.total:
            self.wait_for(needed)
            context.check_cancelled()
            try:
                return read_toc(self.path, size=self.total)
            except End:
                needed *= 2  # it goes on past these bytes
            except ValueError:
                break  # damaged: named below
        self.wait_for(needed)
        return readable_toc(self.path, size=self.total)

    def stop(self) -> None:
        self.abandon()
        self._thread.join()


@contextlib.contextmanager
def restore_folder(
    context: StageContext, *, settings: Settings, store: ObjectStore
) -> Iterator[RestoreFolder]:
    """The restore stage's folder, removed when the stage ends; an archive starts
    downloading into it at once, so the download overlaps the preview's creation
    (pipeline.steps.restore)."""
    job = context.job
    assert job.upload_key is not None
    facts = job.facts
    # The version fetch checked; a job fetched before uploads were pinned has no ETag.
    upload = StoredObject(
        job.upload_key, recorded(facts.upload_bytes, "upload_bytes"), None, facts.upload_etag
    )
    with stage_folder(settings, job, "restore") as folder, contextlib.ExitStack() as stack:
        download = None
        if recorded(facts.dump_format, "dump_format") in ARCHIVES:
            limit = Project.get_by_id(job.project_id).storage_limit_bytes
            download = _Download(store, upload, os.path.join(folder, "upload"), limit)
            stack.callback(download.stop)  # before the folder goes
            # A cancel releases the lanes waiting for its bytes at once.
            stack.callback(context.cancellation.on_cancel(download.abandon))
        yield RestoreFolder(folder, download)


def restore_upload(
    context: StageContext,
    prepared: RestoreFolder,
    *,
    settings: Settings,
    store: ObjectStore,
    tools: PgTools,
    target: SourceURL,
    open_target: Callable[[], psycopg2.extensions.connection],
) -> dict[str, Any]:
    """Restore the upload into `target` (the empty preview, as the restore role;
    `open_target` opens a session there), from object storage and the facts fetch
    recorded: an archive (downloaded into the stage's folder, `restore_folder`) is
    restored on the copy engine (pipeline.steps.archive), which counts its rows; plain
    SQL is streamed into psql (its rows were counted by fetch). Returns the facts it adds."""
    job = context.job
    assert job.upload_key is not None
    facts = job.facts
    project = Project.get_by_id(job.project_id)
    upload = StoredObject(
        job.upload_key, recorded(facts.upload_bytes, "upload_bytes"), None, facts.upload_etag
    )
    skipped = facts.restore_skip if facts.restore_skip is not None else facts.rehearsal_skipped
    fmt = recorded(facts.dump_format, "dump_format")
    if prepared.download is not None:
        return _restore_archive(
            context,
            prepared.download,
            fmt,
            settings=settings,
            tools=tools,
            folder=prepared.folder,
            target=target,
            open_target=open_target,
        )
    gzipped = fmt == "gzip-plain"
    context.check_cancelled()

    progress = _bytes_progress(context, "restoring", tables_total=len(facts.source_counts or {}))

    def feed(out: BinaryIO) -> None:
        _filter_upload(store, upload, gzipped, sql_limit(project), skipped, progress, counter=None, out=out)

    restore_plain_stream(tools, target, feed, prepared.folder)
    return {}


def _restore_archive(
    context: StageContext,
    download: _Download,
    fmt: str,
    *,
    settings: Settings,
    tools: PgTools,
    folder: str,
    target: SourceURL,
    open_target: Callable[[], psycopg2.extensions.connection],
) -> dict[str, Any]:
    """Restore an archive on the copy engine (pipeline.steps.archive).

    A custom archive is restored while it downloads: its schema once its table of
    contents is on disk, each table's rows once the bytes up to the end of its data
    block are. The archive is walked for completeness (fetch may have read only its
    head) before the stage ends, so an archive cut short fails the stage and its
    preview is never swapped in; when the restore fails on an archive that turns out cut
    short, that is the error. A tar archive is downloaded and walked first: a cut one
    can make pg_restore loop."""
    if fmt != "custom":
        archive = download.wait(context)
        check_complete(archive, fmt)
        context.check_cancelled()
        return restore_archive_upload(
            context,
            settings=settings,
            tools=tools,
            archive=archive,
            folder=folder,
            target=target,
            open_target=open_target,
        )
    contents = download.table_of_contents(context)
    try:
        restored = restore_archive_upload(
            context,
            settings=settings,
            tools=tools,
            archive=download.path,
            folder=folder,
            target=target,
            open_target=open_target,
            contents=contents,
            arriving=download,
        )
    except PermanentError:
        if download.complete:
            check_complete(download.path, fmt)  # the better reason, when it is one
        raise
    download.wait(context)
    check_complete(download.path, fmt)
    return restored


def _archive_facts(
    tools: PgTools,
    archive: str,
    folder: str,
    skipped: list[dict[str, Any]],
    allowlist: list[str] | tuple[str, ...],
    encoding: str,
) -> dict[str, Any]:
    """Read the archive's TOC: what the project role restores, what it skips and why,
    which extensions (in which schemas) the service creates first, the source's
    encoding (names and rows are decoded from it), and the database's settings and
    comment (set at finalize, see stages.database.dbsettings). restore computes the same plan
    again from these facts (`extensions`, the skip list) and the same archive."""
    entries, database_entries = toc.read_with_database(tools, archive, encoding=encoding)
    extensions = toc.extension_schemas(tools, archive, entries, folder)
    require_allowlisted(extensions, allowlist)
    plan = toc.plan(entries, precreated_schemas=set(extensions.values()) - {"public"}, skip=skip_map(skipped))
    return {
        "extensions": extensions,
        "extension_comments": toc.extension_comments(tools, archive, entries, folder, encoding=encoding),
        "skipped": plan.skipped,
        "toc_kinds": toc.kind_counts(entries),
        "dump_encoding": encoding,
        "database_properties": dbsettings.read_archive(
            tools, archive, folder, database_entries, encoding=encoding
        ).facts(),
    }


def _filter_upload(
    store: ObjectStore,
    upload: StoredObject,
    gzipped: bool,
    max_bytes: int,
    skipped: list[dict[str, Any]],
    progress: Callable[[int, int], None],
    *,
    counter: RowCounter | None,
    out: BinaryIO | None,
) -> PlainSql:
    """Stream the plain upload from storage through the filter into `out` (nowhere
    when None: counting only), in bounded memory."""
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(store.reader(upload.key, expected=upload, on_progress=progress))
        sink = out if out is not None else stack.enter_context(open(os.devnull, "wb"))
        return filter_plain_sql(
            source, sink, gzipped=gzipped, max_bytes=max_bytes, counter=counter, skip=skip_map(skipped)
        )


def _rehearse_plain_schema(
    context: StageContext,
    settings: Settings,
    sealer: Sealer,
    store: ObjectStore,
    upload: StoredObject,
    folder: str,
    *,
    gzipped: bool,
    max_bytes: int,
) -> list[dict[str, Any]]:
    """Preflight rehearsed the head of a plain upload; here, before anything is
    restored, the schema of the whole script is (its data left out, read from storage
    as it streams): what the project cannot hold and no table needs is returned to be
    skipped, anything else fails the job as preflight would (PermanentError naming
    every problem)."""
    job = context.job
    schema = os.path.join(folder, "schema.sql")
    context.progress({"phase": "rehearsing the whole schema"})
    try:
        with store.reader(upload.key, expected=upload) as source:
            keep_schema(source, schema, gzipped=gzipped)
    except ScriptError as err:
        raise PermanentError(f"the SQL script cannot be read as psql reads it: {err}") from err
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise PermanentError(
            f"the gzip-compressed dump is cut short or corrupt ({err}); upload the whole file again, "
            "or run pg_dump again if it stopped early, e.g. pg_dump ... | gzip > dump.sql.gz"
        ) from err
    project = Project.get_by_id(job.project_id)
    setup = rehearsal_setup(project, settings, sealer, folder, full=True, cancellation=context.cancellation)
    result = rehearse_plain(
        schema,
        setup.sandbox,
        folder,
        setup.deadline,
        gzipped=False,
        complete=True,
        max_bytes=max_bytes,
        allowed_extensions=set(settings.extension_allowlist) | {"plpgsql"},
    )
    os.remove(schema)
    report = Preflight()
    report_rehearsal(report, result, full=True)
    report.raise_for_failure()
    return result.skipped


def _bytes_progress(context: StageContext, phase: str, **more: Any) -> Callable[[int, int], None]:
    """Report bytes streamed so far, with `more` (each report a write to the job row,
    and a cancellation point): the first, the last, and at most one per PROGRESS_SECONDS."""
    last = [float("-inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_SECONDS:
            return
        last[0] = now
        context.progress({"phase": phase, "bytes_done": done, "bytes_total": total, **more})

    return report
