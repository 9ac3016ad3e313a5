"""What each stage does for an import job: the glue between a job row and `stages`.

Each step reads what it needs from the job (request, earlier stages' `facts`), calls
the stage functions, and returns the facts it adds. Steps never change the job's state:
the Runner does that from what they return or raise.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

from pipeline import jobs
from pipeline.accounts import cluster_admin
from pipeline.config import Settings
from pipeline.models import Cluster, Job, Project, RetiredDatabase, utcnow
from pipeline.sealing import Sealer
from stages.cluster import ClusterAdmin
from stages.commands import CommandResult, PgTools
from stages.dumpformat import detect_format
from stages.dumpgate import check_archive_readable, check_versions
from stages.dumprows import RowCounter, count_archive_rows
from stages.errors import CapyError, ObjectMissing, PermanentError
from stages.fetch import dump_live
from stages.finalize import verify_preview
from stages.pgurl import SourceURL
from stages.plainsql import prepare_plain_sql
from stages.preflight import Target, check_live_source, check_upload
from stages.restore import restore_archive, restore_plain
from stages.storage import ObjectStore

log = logging.getLogger(__name__)


class StageContext:
    """The job being worked on, with the few things a step may do to it."""

    def __init__(self, job: Job, actor: str) -> None:
        self.job = job
        self.actor = actor
        self.lost = threading.Event()

    def progress(self, progress: dict[str, Any]) -> None:
        jobs.set_progress(self.job.id, self.actor, {"stage": self.job.stage, **progress})

    def set_fields(self, **values: Any) -> None:
        jobs.update_fields(self.job.id, self.actor, **values)


def preview_name(job: Job) -> str:
    return "capy_preview_" + job.id.removeprefix("job_")


class ImportSteps:
    def __init__(
        self,
        settings: Settings,
        sealer: Sealer,
        store: ObjectStore,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sealer = sealer
        self.store = store
        self.clock = clock

    # -- helpers -----------------------------------------------------------------

    def run(self, stage: str, context: StageContext) -> dict[str, Any]:
        return getattr(self, stage)(context)

    def _admin(self, job: Job) -> ClusterAdmin:
        return cluster_admin(Cluster.get_by_id(job.cluster_id), self.sealer)

    def _tools(self, job: Job) -> PgTools:
        """The target cluster's major version of the tools; each run is recorded on the job."""
        cluster = Cluster.get_by_id(job.cluster_id)

        def record(result: CommandResult) -> None:
            jobs.record_command(job.id, exit_code=result.exit_code, stdout=result.stdout_tail, stderr=result.stderr_tail)

        return PgTools.for_major(cluster.server_major, self.settings.pg_bin_dir_template, record)

    def _work_dir(self, job: Job) -> str:
        return os.path.join(self.settings.work_dir, job.id)

    def _source(self, job: Job) -> SourceURL:
        return SourceURL.parse(self.sealer.open(job.source_url_encrypted))

    def _target(self, job: Job, admin: ClusterAdmin) -> Target:
        project = Project.get_by_id(job.project_id)
        return Target(
            major=admin.server_major(),
            storage_limit_bytes=project.storage_limit_bytes,
            recreate=job.recreate,
            is_empty=lambda: admin.is_empty(project.database_name),
        )

    # -- stages -------------------------------------------------------------------

    def preflight(self, context: StageContext) -> dict[str, Any]:
        job = context.job
        context.progress({"phase": "checking the source and the target"})
        admin = self._admin(job)
        if job.upload_key:
            try:
                size = self.store.size(job.upload_key)
            except ObjectMissing as err:
                raise PermanentError(
                    f"the upload {job.upload_key} no longer exists; upload the dump again"
                ) from err
            report = check_upload(size, self._target(job, admin))
            report.raise_for_failure()
            return {"preflight": {"checks": [c.as_dict() for c in report.checks], "source": report.source}}
        report = check_live_source(
            self._source(job),
            self._target(job, admin),
            allow_private=self.settings.allow_private_sources,
            timeout=self.settings.source_connect_timeout,
        )
        report.raise_for_failure()
        assert report.pinned is not None
        return {
            "preflight": {"checks": [check.as_dict() for check in report.checks], "source": report.source},
            # Later stages connect to exactly the address that was checked.
            "source_address": report.pinned.params["hostaddr"],
        }

    def fetch(self, context: StageContext) -> dict[str, Any]:
        if context.job.upload_key:
            return self._fetch_upload(context)
        job = context.job
        source = self._source(job).with_params(hostaddr=job.facts["source_address"])
        out_dir = os.path.join(self._work_dir(job), "dump")
        os.makedirs(self._work_dir(job), exist_ok=True)
        context.progress({"phase": "dumping the source"})
        dump = dump_live(
            source,
            self._tools(job),
            out_dir,
            jobs=self.settings.concurrency,
            timeout=self.settings.source_connect_timeout,
            on_progress=context.progress,
        )
        return {
            "dump_path": dump.path,
            "dump_format": "directory",
            "uncounted_tables": [],
            "dump_bytes": dump.bytes,
            "source_counts": dump.source_counts,
            "source_server_version": dump.server_version,
        }

    def _fetch_upload(self, context: StageContext) -> dict[str, Any]:
        """Download the upload (bounded memory), identify it, and prove the target's
        tools can read it; count its rows for finalize to compare against."""
        job = context.job
        work = self._work_dir(job)
        os.makedirs(work, exist_ok=True)
        project = Project.get_by_id(job.project_id)
        limit = project.storage_limit_bytes
        download = os.path.join(work, "upload")

        def downloaded(done: int, total: int) -> None:
            context.progress({"phase": "downloading the upload", "bytes_done": done, "bytes_total": total})

        size = self.store.download(job.upload_key, download, max_bytes=limit, on_progress=downloaded)
        info = detect_format(download)
        tools = self._tools(job)
        major = Cluster.get_by_id(job.cluster_id).server_major
        check_versions(info, major)
        facts: dict[str, Any] = {
            "upload_bytes": size,
            "dump_format": info.format,
            "dump_info": {
                "archive_version": info.archive_version,
                "dumped_by": info.dumped_by,
                "dumped_from": info.dumped_from,
            },
        }
        if info.format in ("custom", "tar"):
            check_archive_readable(tools, download, info, major)
            context.progress({"phase": "counting the rows in the dump", "bytes_total": size})
            counts, uncounted = count_archive_rows(tools, download)
            dump_path = download
        else:
            dump_path = os.path.join(work, "dump.sql")
            counter = RowCounter()
            context.progress({"phase": "preparing the SQL", "bytes_total": size})
            # Decompressed SQL may be larger than the data it loads, but not without bound.
            prepare_plain_sql(
                download, dump_path, gzipped=info.format == "gzip-plain", max_bytes=2 * limit, counter=counter
            )
            os.remove(download)
            counts, uncounted = counter.result()
        return {
            **facts,
            "dump_path": dump_path,
            "dump_bytes": os.path.getsize(dump_path),
            "source_counts": counts,
            "uncounted_tables": uncounted,
        }

    def restore(self, context: StageContext) -> dict[str, Any]:
        job = context.job
        dump_path = job.facts["dump_path"]
        if not os.path.exists(dump_path):
            raise PermanentError(
                "the dump made by the fetch stage is not in this worker's work directory; "
                "CAPY_WORK_DIR must be shared by all workers"
            )
        admin = self._admin(job)
        preview = preview_name(job)
        context.set_fields(preview_database_id=preview)
        context.progress({"phase": "creating the preview database", "preview_database_id": preview})
        admin.drop_database(preview)  # a retried restore starts from an empty preview
        admin.create_database(preview)
        context.progress({"phase": "restoring", "tables_total": len(job.facts.get("source_counts", {}))})
        target = admin.database_url(preview)
        fmt = job.facts["dump_format"]
        if fmt in ("plain", "gzip-plain"):
            restore_plain(self._tools(job), target, dump_path)
        else:
            restore_archive(self._tools(job), target, dump_path, jobs=self.settings.concurrency, fmt=fmt)
        return {"preview_database": preview}

    def finalize(self, context: StageContext) -> dict[str, Any]:
        job = context.job
        admin = self._admin(job)
        project = Project.get_by_id(job.project_id)
        preview = job.facts["preview_database"]
        retired = RetiredDatabase.get_or_none(RetiredDatabase.job == job.id)
        if retired and not admin.database_exists(preview):
            # A previous attempt swapped and then lost its commit: the swap is done.
            return {"report": job.facts.get("report", {}), "replaced_database": retired.database_name}
        context.progress({"phase": "verifying row counts"})
        source_counts = job.facts["source_counts"]
        target_counts = verify_preview(admin, preview, source_counts, job.facts.get("uncounted_tables", []))
        # The gate again, just before the destructive step: the project's database
        # may have received data since preflight.
        if not job.recreate and not admin.is_empty(project.database_name):
            raise PermanentError(
                "the project's database is no longer empty; it received objects after the "
                'import started. Send "recreate": true to replace them'
            )
        replaced = f"{project.database_name}_replaced_{self.clock():%Y%m%d%H%M%S}"
        if retired is None:
            RetiredDatabase.create(
                cluster=job.cluster_id,
                project=project.id,
                job=job.id,
                database_name=replaced,
                drop_after=self.clock()
                + dt.timedelta(seconds=self.settings.replaced_database_retention_seconds),
            )
        else:
            replaced = retired.database_name
        context.progress({"phase": "swapping the preview in"})
        admin.swap(live=project.database_name, preview=preview, replaced=replaced)
        report = {
            "tables": {
                name: {"source_rows": source_counts[name], "target_rows": target_counts.get(name)}
                for name in sorted(source_counts)
            },
            "uncounted_tables": job.facts.get("uncounted_tables", []),
            "table_count": len(source_counts),
            "row_count": sum(source_counts.values()),
            "replaced_database": replaced,
        }
        return {"report": report, "replaced_database": replaced}

    def cleanup(self, job: Job, *, succeeded: bool) -> None:
        """Remove the job's temporary files, its upload (unless a retention is set:
        then `capy-imports sweep` deletes it later) and, after a failure, its preview."""
        shutil.rmtree(self._work_dir(job), ignore_errors=True)
        if job.upload_key and self.settings.upload_retention_seconds <= 0:
            try:
                self.store.delete(job.upload_key)
            except CapyError:
                log.exception("job %s: could not delete upload %s", job.id, job.upload_key)
        if not succeeded and job.preview_database_id:
            try:
                self._admin(job).drop_database(job.preview_database_id)
            except Exception:
                log.exception("job %s: could not drop preview %s", job.id, job.preview_database_id)
