"""What the stages of an import job share: the job being worked on (StageContext) and
the services, tools and helpers every stage uses (ImportSteps).

Each stage is a module of pipeline.steps, listed in pipeline.steps.registry: it reads
what it needs from the job (the request, earlier stages' facts, typed as
pipeline.steps.results.JobFacts), calls the Postgres toolkit in `stages`, and returns
its result model, which the Runner merges into the job's facts. Stages never change the
job's state: the Runner does that from what they return or raise.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import peewee
import psycopg2

from pipeline import jobs, spares
from pipeline.accounts import cluster_admin
from pipeline.config import Settings
from pipeline.limits import command_limit, job_deadline
from pipeline.models import Cluster, Job, utcnow
from pipeline.sealing import Sealer
from pipeline.steps.registry import spec_of
from pipeline.steps.results import JobFacts, RestoreResult, StageFacts, StageResult, ToolProcess
from stages.background import Background
from stages.connections.pgurl import SourceURL
from stages.database import dbsettings
from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.dumps import toc
from stages.errors import Cancelled, CapyError
from stages.preflight.extensions import require_allowlisted
from stages.preflight.rehearsal import skip_map
from stages.storage import ObjectStore
from stages.tools.commands import Cancellation, CommandResult, PgTools, kill_process_group

log = logging.getLogger(__name__)

# `_preview_started`'s wait for the preview: (extensions, their comments) -> the URL the
# restore connects to, the restore role, the preview's name.
PreviewReady = Callable[[dict[str, str], dict[str, str]], tuple[SourceURL, RoleLogin, str]]


class StageContext:
    """The job being worked on, with the few things a step may do to it.

    `cancellation` holds the stage's running commands: when the job is cancelled (the
    heartbeat thread sees the request) they are stopped, and the stage's next progress
    report or cancellation point raises Cancelled.

    Every write goes through the job's claim: once the claim is lost (taken over by
    another worker, or the job ended), a write raises ClaimLost and the heartbeat stops
    the stage's commands, so nothing more of this attempt reaches the cluster.
    """

    def __init__(self, job: Job, actor: str) -> None:
        self.job = job
        self.actor = actor
        self.cancellation = Cancellation()
        self.lost = False

    def lose_claim(self) -> None:
        """The claim was taken over: stop the stage's commands (the heartbeat calls this)."""
        self.lost = True
        self.cancellation.cancel(f"{self.actor} lost its claim of the job to another worker")

    def check_claim(self) -> None:
        if self.lost:
            raise jobs.ClaimLost(f"{self.actor} no longer holds job {self.job.id}; its new holder runs it")

    def confirm_claim(self) -> None:
        """Prove in the control database, just before a destructive step on the cluster
        (dropping a preview, the swap), that this worker still holds the job."""
        self.check_claim()
        self._written(jobs.heartbeat(self.job.id, self.actor))

    def _written(self, held: bool) -> None:
        if not held:
            self.lose_claim()
            self.check_claim()

    def progress(self, progress: dict[str, Any]) -> None:
        self.check_claim()
        self.check_cancelled(ask=False)
        self._written(jobs.set_progress(self.job.id, self.actor, {"stage": self.job.stage, **progress}))

    def cancel_request(self) -> str | None:
        """Why the job is being cancelled, if it is: this process was told, or the
        control database says so. If the control database cannot be read, what this
        process was told stands (the caller's own error, or commit, comes next)."""
        if self.cancellation.reason is None:
            try:
                reason = jobs.cancel_reason(self.job.id)
            except (peewee.PeeweeException, psycopg2.Error) as err:
                log.warning(
                    "job %s: could not read whether it is cancelled: %s", self.job.id, type(err).__name__
                )
                reason = None
            if reason is not None:
                self.cancellation.cancel(reason)
        return self.cancellation.reason

    def check_cancelled(self, *, ask: bool = True) -> None:
        """A cancellation point: raise Cancelled if the job is being cancelled (`ask`:
        read the control database too, not only what the heartbeat thread passed on)."""
        self.check_claim()
        reason = self.cancel_request() if ask else self.cancellation.reason
        if reason is not None:
            raise Cancelled(reason)

    def set_preview(self, preview: str) -> None:
        self._written(jobs.set_preview(self.job.id, self.actor, preview))

    def merge_facts(self, facts: StageFacts) -> None:
        """Add facts to the job now (before the stage's result), merged in the database."""
        self._written(jobs.merge_facts(self.job.id, self.actor, facts))

    def record_command(self, result: CommandResult) -> None:
        """The last external command's result, on the job (a lost claim is noted: the
        heartbeat stops the stage, and the command's own error propagates meanwhile)."""
        if not jobs.record_command(
            self.job.id,
            self.actor,
            exit_code=result.exit_code,
            stdout=result.stdout_tail,
            stderr=result.stderr_tail,
        ):
            self.lose_claim()


def preview_name(job: Job) -> str:
    return "capy_preview_" + job.id.removeprefix("job_")


RESTORE_ROLE_PREFIX = "capy_restore_"


def host_identity() -> str:
    """This host, as recorded with a tool's process group: its name and boot (a group
    id means nothing on another host, or on this one after a reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def restore_role_name(job: Job | str) -> str:
    """The role that runs this import's dump (`job`, or its id): it owns the preview and
    nothing else."""
    job_id = job if isinstance(job, str) else job.id
    return RESTORE_ROLE_PREFIX + job_id.removeprefix("job_")


class ImportSteps:
    """Runs the stages of pipeline.steps.registry for the Runner, with what they share:
    the settings, the sealer, object storage, the job's cluster admin and tools, the
    test holds, the preview, and the cleanup after a job ends or a claim is taken over."""

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
        # The admin of each job whose stage runs now (one per job: a job runs one stage at a time).
        self._stage_admins: dict[str, ClusterAdmin] = {}

    def run(self, stage: str, context: StageContext) -> StageResult:
        """Run one stage (pipeline.steps.registry). Whatever a stage stopped by a cancel
        raises (a killed tool's error, a dropped connection) becomes Cancelled; by a lost
        claim, ClaimLost."""
        spec = spec_of(stage)
        admin = cluster_admin(Cluster.get_by_id(context.job.cluster_id), self.sealer)
        self._stage_admins[context.job.id] = admin
        try:
            with admin.held_session():
                result = spec.run(self, context)
                if not isinstance(result, spec.result):
                    raise TypeError(
                        f"the {stage} stage returned {type(result).__name__}, not {spec.result.__name__}"
                    )
                return result
        except jobs.ClaimLost:
            raise
        except Cancelled as err:
            context.check_claim()  # stopped because the claim was lost, not by a cancel
            raise err
        except Exception as err:
            if context.lost:
                raise jobs.ClaimLost(
                    f"{context.actor} no longer holds job {context.job.id}; its new holder runs it"
                ) from err
            reason = context.cancel_request()
            if reason is not None:
                raise Cancelled(reason) from err
            raise
        finally:
            self._stage_admins.pop(context.job.id, None)

    # -- helpers -----------------------------------------------------------------

    def _admin(self, job: Job) -> ClusterAdmin:
        """The job's cluster's admin; during a stage the same one (its maintenance
        session held for the stage, see ClusterAdmin.held_session)."""
        admin = self._stage_admins.get(job.id)
        return admin if admin is not None else cluster_admin(Cluster.get_by_id(job.cluster_id), self.sealer)

    def _tools(self, context: StageContext, *, cancellable: bool = True) -> PgTools:
        """The target cluster's major version of the tools; each run is recorded on the
        job (through its claim), and ends by the command limit or the job's own
        deadline, whichever is first, or when the job is cancelled (`cancellable`) or
        the claim lost."""
        job = context.job
        cluster = Cluster.get_by_id(job.cluster_id)

        def started(pgid: int, program: str) -> None:
            jobs.record_tool_process(
                job.id,
                context.actor,
                ToolProcess(host=host_identity(), pgid=pgid, program=program, label=job.id),
            )

        return PgTools.for_major(
            cluster.server_major,
            self.settings.pg_bin_dir_template,
            context.record_command,
            limit=command_limit(self.settings),
            deadline=job_deadline(job, self.settings),
            stall_seconds=self.settings.command_stall_seconds,
            cancellation=context.cancellation if cancellable else None,
            on_start=started,
            label=job.id,
        )

    def _hold_seconds(self, job: Job, point: str) -> float:
        """How long a test hold at `point` lasts for this job: only the first time the
        job reaches it (CAPY_TEST_HOLDS; 0 in production)."""
        seconds = self.settings.hold_seconds(point)
        return 0.0 if point in job.facts.test_holds_done else seconds

    def _hold(
        self, context: StageContext, point: str, tools: PgTools | None = None, url: SourceURL | None = None
    ) -> None:
        """Tests only (CAPY_TEST_HOLDS): the first time a job reaches `point` it waits
        there, for a fault-injection test to kill the worker; with `tools` and `url` the
        wait is a real tool (psql running pg_sleep there), as a slow pg_dump or restore
        would be."""
        job = context.job
        seconds = self._hold_seconds(job, point)
        if not seconds:
            return
        context.merge_facts(JobFacts(test_holds_done=[*job.facts.test_holds_done, point]))
        context.progress({"phase": f"test hold: {point}"})
        log.warning("job %s: holding %s s at %s (CAPY_TEST_HOLDS, tests only)", job.id, seconds, point)
        if tools is None or url is None:
            time.sleep(seconds)
            return
        psql = tools.psql
        psql.run(
            [
                "--no-psqlrc",
                "--no-password",
                f"--dbname={url.conninfo()}",
                f"--command=SELECT pg_catalog.pg_sleep({seconds})",
            ],
            env=url.env(),
            secrets=[url.password],
            what=f"test hold at {point}",
        )

    def take_over(self, job: Job) -> None:
        """Before a stage runs again after another claim of it: make sure the tool that
        claim started is gone. On this host (same boot) its process group is killed if
        it is still there; on another host the kernel killed it with its worker (the
        parent-death signal, see stages.tools.commands). Sessions it left in the preview end."""
        self.stop_left_tool(job)
        self.stop_sessions(job)

    @staticmethod
    def stop_left_tool(job: Job) -> None:
        """Kill what is left on this host of the last tool a claim of the job started
        (its process group, recognised by program and job label). On another host the
        parent-death signal and the group's reaper stopped it (stages.tools.commands)."""
        process = job.facts.tool_process
        if process and process.host == host_identity():
            killed = kill_process_group(process.pgid, process.program, process.label)
            if killed:
                log.warning(
                    "job %s: killed %s left running by an earlier claim (pids %s)",
                    job.id,
                    process.program,
                    killed,
                )

    def _work_dir(self, job: Job) -> str:
        return os.path.join(self.settings.work_dir, job.id)

    def _source(self, job: Job) -> SourceURL:
        if job.source_url_encrypted is None:
            raise KeyError(f"job {job.id} has no source URL (it imports an upload)")
        return SourceURL.parse_source(self.sealer.open(job.source_url_encrypted))

    # -- shared by the stages (pipeline.steps) ------------------------------------

    def _plan_archive(
        self,
        tools: PgTools,
        archive: str,
        work: str,
        rehearsal_skipped: list[dict[str, Any]],
        *,
        encoding: str,
    ) -> tuple[dict[str, Any], list[toc.TocEntry]]:
        """Read the archive's TOC: what the project role restores, what it skips and
        why, which extensions (in which schemas) the service creates first, and the
        database's settings and comment (set at finalize, see stages.database.dbsettings).
        `encoding`: the source's, as the archive says (names and rows are decoded from it)."""
        entries, database_entries = toc.read_with_database(tools, archive, encoding=encoding)
        extensions = toc.extension_schemas(tools, archive, entries, work)
        require_allowlisted(extensions, self.settings.extension_allowlist)
        plan = toc.plan(
            entries,
            precreated_schemas=set(extensions.values()) - {"public"},
            skip=skip_map(rehearsal_skipped),
        )
        list_path = os.path.join(work, "restore.list")
        with open(list_path, "w", encoding="utf-8") as fh:
            fh.write(plan.list_file())
        return {
            "extensions": extensions,
            "extension_comments": toc.extension_comments(tools, archive, entries, work, encoding=encoding),
            "skipped": plan.skipped,
            "restore_list": list_path,
            "toc_kinds": toc.kind_counts(entries),
            "dump_encoding": encoding,
            "database_properties": dbsettings.read_archive(
                tools, archive, work, database_entries, encoding=encoding
            ).facts(),
        }, plan.keep

    def _new_preview(
        self, context: StageContext, extensions: dict[str, str], extension_comments: dict[str, str]
    ) -> tuple[SourceURL, RoleLogin, str]:
        """A new, empty preview owned by the import's restore role (an earlier attempt's
        is dropped), with `extensions` (name -> schema) created in it, and their
        comments: the URL the restore connects to, the role, and the preview's name."""
        with self._preview_started(context) as ready:
            return ready(extensions, extension_comments)

    @contextlib.contextmanager
    def _preview_started(self, context: StageContext) -> Iterator[PreviewReady]:
        """Start making the job's new, empty preview (as `_new_preview`) in the
        background, while the stage reads what it will restore; the function yielded
        waits for it and creates the extensions, once the archive has named them.

        Creating a database takes a tenth of a second or more: for a small import that
        is a large part of its wait, and it needs nothing from the archive. The preview
        is made (or has failed) by the time the block is left, whatever happened in it,
        so a failure's cleanup finds it."""
        job = context.job
        admin = self._admin(job)
        preview = preview_name(job)
        context.set_preview(preview)
        context.progress({"phase": "creating the preview database", "preview_database_id": preview})
        context.confirm_claim()

        def create() -> RoleLogin:
            admin.drop_database(preview)  # a retried restore starts from an empty preview
            restorer = admin.ensure_restore_role(restore_role_name(job))
            admin.create_database(preview, owner=restorer.name, spare=True)
            return restorer

        making = Background(create, name=f"preview-{job.id}")

        def ready(
            extensions: dict[str, str], extension_comments: dict[str, str]
        ) -> tuple[SourceURL, RoleLogin, str]:
            restorer = making.result()
            # In the empty preview, before any of the dump's SQL has run.
            own_rows = admin.create_extensions(preview, restorer.name, extensions, extension_comments)
            context.merge_facts(RestoreResult(extension_rows=own_rows))
            return admin.role_url(preview, restorer), restorer, preview

        try:
            yield ready
        finally:
            try:
                making.settle()  # the preview exists, or has failed, before the stage's cleanup
            finally:
                # Python delivers an exception raised in this thread (a time limit) as a
                # function is entered: one landing as `settle` was called ended it unwaited.
                making.join()

    def cleanup(self, job: Job, *, succeeded: bool) -> None:
        """Remove the job's temporary files, its upload (unless a retention is set:
        then `capy-imports sweep` deletes it later) and, after a failure, its preview;
        then its restore role; then the cluster's spare databases are made again in the
        background. A tool an earlier claim left running here is killed first."""
        if not succeeded:
            self.stop_left_tool(job)
        shutil.rmtree(self._work_dir(job), ignore_errors=True)
        if job.upload_key and self.settings.upload_retention_seconds <= 0:
            try:
                self.store.delete(job.upload_key)
                jobs.mark_upload_deleted(job.id)
            except CapyError:
                log.exception("job %s: could not delete upload %s", job.id, job.upload_key)
        if not succeeded and job.preview_database_id:
            try:
                # WITH (FORCE): sessions still running a stopped restore's statement end too.
                self._admin(job).drop_database(job.preview_database_id)
            except Exception:
                log.exception("job %s: could not drop preview %s", job.id, job.preview_database_id)
        if job.preview_database_id:
            # After the preview (which it owns) is gone; a completed job's was dropped at the hand-over.
            try:
                self._admin(job).drop_role(restore_role_name(job))
            except Exception:
                log.exception("job %s: could not drop its restore role", job.id)
        if self.settings.spare_databases > 0:
            # What the job took of its cluster's spare databases is made again, for the next.
            try:
                spares.keep_in_background(job.cluster_id, self._admin(job), self.settings.spare_databases)
            except Exception:
                log.exception("job %s: could not start keeping the spare databases", job.id)

    def stop_sessions(self, job: Job) -> None:
        """After an attempt failed and will be retried: end every session still in the
        job's preview (the retried restore drops and recreates it; a retried finalize
        opens its own)."""
        if not job.preview_database_id:
            return
        try:
            ended = self._admin(job).terminate_sessions(job.preview_database_id)
        except Exception:
            log.exception("job %s: could not end the sessions in preview %s", job.id, job.preview_database_id)
            return
        if ended:
            log.info("job %s: ended %d session(s) left in preview %s", job.id, ended, job.preview_database_id)
