"""The contract between stages: what each stage hands to the later ones, typed.

A stage returns its result model (`PreflightResult`, `FetchResult`, `RestoreResult`,
`FinalizeResult`); the Runner merges what the stage set (`stored()`: the fields it
passed, `None` included, never the defaults it left alone) into the job's `facts`
column, a JSON object, in one statement (jsonb `||`). Later stages read the
accumulated facts as a `JobFacts` (`job.facts.source_counts`), parsed from the column
whenever a job row is read (pipeline.models.FactsField).

Rows written by earlier versions of the service load: every field has a default, so a
fact an older stage did not write is simply missing; keys no field names (`dump_path`,
`restore_list`, a test's own) are kept in `JobFacts.model_extra`, and stay in the row.
A stage's own result refuses a key no field names: a misspelt fact fails the stage,
instead of being written under a name nobody reads.

Nested JSON that another package owns and pipeline only passes along (the preflight
response, the report, the database's settings, the target's description) stays a
`dict`; what pipeline reads inside is typed.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class Fact(BaseModel):
    """A nested fact: tolerant of missing and unknown keys, like the row it is read from."""

    model_config = ConfigDict(extra="allow")


class ToolProcess(Fact):
    """The external tool a claim of the stage started: whoever takes the stage over
    kills it if it runs on its host (ImportSteps.stop_left_tool)."""

    host: str | None = None  # host name and boot id (pipeline.import_steps.host_identity)
    pgid: int
    program: str
    label: str | None = None


class DumpInfo(Fact):
    """An uploaded archive's header (stages.dumps.formats.DumpInfo)."""

    archive_version: str | None = None
    dumped_by: str | None = None
    dumped_from: str | None = None


class SourceDescription(Fact):
    """What the report compares on the source's side: object counts by kind, sequence
    values (None: not called yet), extensions and their versions (None: unknown)."""

    objects: dict[str, int] = Field(default_factory=dict)
    sequences: dict[str, int | None] = Field(default_factory=dict)
    extensions: dict[str, str | None] = Field(default_factory=dict)


class Verification(Fact):
    """The preview's verification, recorded before the hand-over (a finalize retried
    after it cannot connect as the restore role again)."""

    target_counts: dict[str, int]
    target: dict[str, Any]  # stages.finalize.verify_preview's description of the preview


class StageFacts(BaseModel):
    """Facts, written by merging what was set into the job's `facts` column."""

    def stored(self) -> dict[str, Any]:
        """The JSON merged into the job's facts: the fields set, `None` included."""
        return self.model_dump(mode="json", exclude_unset=True)


class StageResult(StageFacts):
    """What one stage returns; an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")


class PlanFacts(StageFacts):
    """What the restore plan, read from the dump's table of contents or statements, says."""

    extensions: dict[str, str] = Field(default_factory=dict)  # name -> schema; the service creates them first
    extension_comments: dict[str, str] = Field(default_factory=dict)  # name -> comment; the service sets them
    skipped: list[dict[str, Any]] = Field(
        default_factory=list
    )  # {"object", "reason"}: left out of the restore
    dump_encoding: str | None = None  # the source's encoding (names and rows are decoded from it)
    # The database's settings and comment (stages.database.dbsettings.DatabaseProperties.facts()).
    database_properties: dict[str, Any] | None = None


class CountFacts(StageFacts):
    """What finalize verifies the preview against, and reports."""

    source_counts: dict[str, int] | None = None  # table -> rows on the source
    copied_counts: dict[str, int] | None = None  # table -> rows the copy's COPY put in the preview
    uncounted_tables: list[str] = Field(default_factory=list)  # rows unknown: they must merely exist
    # An extension's configuration table -> the rows its CREATE EXTENSION put in the preview.
    extension_rows: dict[str, int] = Field(default_factory=dict)
    dump_bytes: int | None = None
    source_description: SourceDescription | None = None
    source_basis: str | None = None  # "source snapshot", "dump table of contents", "dump statements"
    source_server_version: str | None = None


class VerificationFacts(StageFacts):
    # None: not verified yet (a new preview voids an earlier one's verification).
    verification: Verification | None = None


class PreflightResult(StageResult):
    """The checks passed: their report, and what later stages keep from them."""

    preflight: dict[str, Any] | None = None  # the published preflight response (stages.preflight.report)
    rehearsal_skipped: list[dict[str, Any]] = Field(default_factory=list)  # what the project cannot hold
    source_address: str | None = None  # live: the address checked, the only one later stages connect to


class FetchResult(StageResult, PlanFacts, CountFacts):
    """A live source sized up, or an upload checked, planned and counted."""

    dump_format: str | None = None  # "live", "custom", "tar", "plain", "gzip-plain"
    source_tables: int | None = None  # live
    source_bytes: int | None = None  # live
    upload_bytes: int | None = None  # upload: the version fetch checked...
    upload_etag: str | None = None  # ...which restore reads again (None: fetched before uploads were pinned)
    dump_info: DumpInfo | None = None  # upload
    restore_skip: list[dict[str, Any]] | None = (
        None  # upload: what restore leaves out (the whole script's rehearsal)
    )


class RestoreResult(StageResult, PlanFacts, CountFacts, VerificationFacts):
    """The preview made; a live restore also counts (its copy's `COPY n`, both sides)."""

    preview_database: str | None = None


class FinalizeResult(StageResult, VerificationFacts):
    """The preview swapped in, and the report of what was imported."""

    report: dict[str, Any] | None = None  # the published report (stages.finalize.build_report)
    replaced_database: str | None = None


class JobFacts(PreflightResult, FetchResult, RestoreResult, FinalizeResult):
    """Every stage's facts so far, as read from the job row, plus what a stage notes
    about itself while it runs. Unknown keys are kept (`model_extra`)."""

    model_config = ConfigDict(extra="allow")

    tool_process: ToolProcess | None = None
    upload_deleted: bool = False  # cleanup or sweep deleted the upload
    test_holds_done: list[str] = Field(default_factory=list)  # tests only (CAPY_TEST_HOLDS)


T = TypeVar("T")


def recorded(value: T | None, name: str) -> T:
    """A fact an earlier stage must have recorded; KeyError naming it when it did not
    (an internal error, as reading a missing key of the JSON was)."""
    if value is None:
        raise KeyError(f"the job's facts have no {name!r}")
    return value
