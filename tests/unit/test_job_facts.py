"""The typed facts between stages: what a stage writes, and what is read back from the
job row, including rows the previous version of the service wrote."""

from __future__ import annotations

import copy
import json
import logging

import pydantic
import pytest

from pipeline.models import Job
from pipeline.serialize import job_json
from pipeline.steps.results import (
    FetchResult,
    FinalizeResult,
    JobFacts,
    PreflightResult,
    RestoreResult,
    StageResult,
    ToolProcess,
    Verification,
    recorded,
)

REPORT = {
    "tables": {"public.a": {"source_rows": 2, "target_rows": 2}},
    "table_count": 1,
    "row_count": 2,
    "uncounted_tables": [],
    "sequences": {"public.a_id_seq": {"source": 2, "target": 2}},
    "objects": {"tables": {"source": 1, "target": 1}},
    "objects_source": "source snapshot",
    "extensions": {},
    "skipped": [{"object": "EVENT TRIGGER t", "reason": "needs a superuser"}],
    "warnings": ["skipped EVENT TRIGGER t: needs a superuser"],
    "database": {"settings": [], "comment": None},
    "replaced_database": "db_replaced_20260101000000",
}

# A completed live import, as the previous version (untyped facts) left its row.
OLD_LIVE_ROW = {
    "preflight": {"ok": True, "checks": [{"name": "connect", "status": "pass", "detail": "ok"}]},
    "rehearsal_skipped": [],
    "source_address": "192.0.2.7",
    "source_server_version": "16.4",
    "source_tables": 1,
    "source_bytes": 8192,
    "dump_format": "live",
    "extensions": {"pg_trgm": "public"},
    "extension_comments": {"pg_trgm": "text similarity"},
    "skipped": [{"object": "EVENT TRIGGER t", "reason": "needs a superuser"}],
    "dump_encoding": "UTF8",
    "database_properties": {"settings": [], "comment": None},
    "source_counts": {"public.a": 2},
    "copied_counts": {"public.a": 2},
    "uncounted_tables": [],
    "dump_bytes": 120,
    "source_description": {
        "objects": {"tables": 1},
        "sequences": {"public.a_id_seq": 2},
        "extensions": {"pg_trgm": "1.6"},
    },
    "source_basis": "source snapshot",
    "preview_database": "capy_preview_abc",
    "verification": None,
    "report": REPORT,
    "replaced_database": "db_replaced_20260101000000",
    "tool_process": {
        "host": "w1/boot",
        "pgid": 4242,
        "program": "/usr/lib/postgresql/16/bin/psql",
        "label": "job_abc",
    },
    "test_holds_done": ["restore"],
}

# An upload fetched by an older version: it left the dump on disk (`dump_path`,
# `restore_list`), before uploads were pinned (no ETag) or tools labelled.
OLDER_UPLOAD_ROW = {
    "preflight": {"ok": True, "checks": []},
    "dump_path": "/var/lib/capy/work/job_abc/upload",
    "restore_list": "/var/lib/capy/work/job_abc/restore.list",
    "toc_kinds": {"TABLE": 3},
    "upload_bytes": 1048576,
    "dump_format": "custom",
    "dump_info": {"archive_version": "1.15", "dumped_by": "16.4", "dumped_from": "16.4"},
    "extensions": {},
    "skipped": [],
    "source_counts": {"public.a": 2, "public.b": 0},
    "source_description": {"objects": {"TABLE": 2}, "sequences": {}, "extensions": {}},
    "source_basis": "dump table of contents",
    "tool_process": {"host": "w1/boot", "pgid": 77, "program": "pg_restore"},
    "upload_deleted": True,
}


def test_a_completed_row_of_the_previous_version_loads_and_round_trips():
    facts = Job.facts.python_value(copy.deepcopy(OLD_LIVE_ROW))
    assert isinstance(facts, JobFacts)
    assert facts.source_counts == {"public.a": 2}
    assert facts.source_description.sequences == {"public.a_id_seq": 2}
    assert facts.tool_process == ToolProcess(
        host="w1/boot", pgid=4242, program="/usr/lib/postgresql/16/bin/psql", label="job_abc"
    )
    assert facts.verification is None and facts.test_holds_done == ["restore"]
    assert facts.report == REPORT
    # Written back as read: nothing added, nothing lost, JSON types kept.
    assert facts.stored() == OLD_LIVE_ROW
    assert JobFacts.model_validate_json(json.dumps(facts.stored())).stored() == OLD_LIVE_ROW


def test_an_older_row_with_missing_facts_and_unknown_keys_loads():
    facts = Job.facts.python_value(copy.deepcopy(OLDER_UPLOAD_ROW))
    # Missing: the defaults the stages read with.
    assert facts.upload_etag is None and facts.copied_counts is None and facts.restore_skip is None
    assert facts.uncounted_tables == [] and facts.extension_comments == {} and facts.rehearsal_skipped == []
    assert facts.tool_process.label is None and facts.upload_deleted
    assert facts.dump_info.dumped_by == "16.4"
    # Unknown: kept, and written back.
    assert facts.model_extra == {
        "dump_path": "/var/lib/capy/work/job_abc/upload",
        "restore_list": "/var/lib/capy/work/job_abc/restore.list",
        "toc_kinds": {"TABLE": 3},
    }
    assert facts.stored() == OLDER_UPLOAD_ROW


def test_a_job_in_flight_between_fetch_and_restore_loads():
    """A deploy between stages: the new restore reads what the old fetch wrote."""
    row = {
        key: OLDER_UPLOAD_ROW[key] for key in ("preflight", "upload_bytes", "dump_format", "source_counts")
    }
    facts = Job.facts.python_value(row)
    assert recorded(facts.upload_bytes, "upload_bytes") == 1048576
    assert facts.restore_skip is None and facts.rehearsal_skipped == []  # restore falls back to the latter
    with pytest.raises(KeyError, match="'dump_encoding'"):
        recorded(facts.dump_encoding, "dump_encoding")


def test_an_empty_or_new_job_has_empty_facts():
    assert Job.facts.python_value({}) == JobFacts()
    assert Job().facts == JobFacts() and Job().facts.stored() == {}
    assert Job.facts.python_value(None) is None


def test_a_row_no_version_wrote_is_still_shown(caplog):
    """An odd row must not make the API fail to list a project's jobs."""
    row = {"source_counts": {"public.a": "many"}, "report": REPORT}
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        facts = Job.facts.python_value(row)
    assert facts.report == REPORT
    assert "do not match their types" in caplog.text


def _job(facts):
    return Job(
        id="job_abc", state="completed", stage="finalize", facts=facts, progress={"phase": "completed"}
    )


def test_the_apis_job_shows_the_report_as_stored():
    shown = job_json(_job(Job.facts.python_value(copy.deepcopy(OLD_LIVE_ROW))))
    assert shown["report"] == REPORT and shown["progress"] == {"phase": "completed"}
    assert "report" not in job_json(_job(Job.facts.python_value(copy.deepcopy(OLDER_UPLOAD_ROW))))
    assert "report" not in job_json(_job(JobFacts()))


def test_a_stage_result_stores_what_it_set_none_included():
    """Merged into the row: a default left alone must not erase what an earlier stage
    wrote (an upload's restore keeps fetch's counts), an explicit None must (a new
    preview voids an earlier verification)."""
    assert RestoreResult(preview_database="capy_preview_abc", verification=None).stored() == {
        "preview_database": "capy_preview_abc",
        "verification": None,
    }
    assert StageResult().stored() == {}
    verified = FinalizeResult(
        verification=Verification(target_counts={"public.a": 2}, target={"objects": {}})
    )
    assert verified.stored() == {
        "verification": {"target_counts": {"public.a": 2}, "target": {"objects": {}}}
    }


def test_a_stage_result_round_trips_through_the_row():
    fetched = FetchResult(
        upload_bytes=10,
        upload_etag="etag",
        dump_format="custom",
        dump_info={"archive_version": "1.15", "dumped_by": "16.4", "dumped_from": "16.4"},
        extensions={"pg_trgm": "public"},
        source_counts={"public.a": 2},
        uncounted_tables=["public.b"],
        source_description={
            "objects": {"TABLE": 2},
            "sequences": {"public.s": None},
            "extensions": {"pg_trgm": None},
        },
        source_basis="dump table of contents",
        restore_skip=[],
    )
    row = fetched.stored()
    facts = Job.facts.python_value({**PreflightResult(preflight={"ok": True}).stored(), **row})
    assert FetchResult.model_validate({name: getattr(facts, name) for name in row}) == fetched
    assert facts.source_description.sequences == {"public.s": None}


def test_a_stage_result_refuses_a_fact_nobody_reads():
    with pytest.raises(pydantic.ValidationError, match="source_count"):
        RestoreResult(preview_database="p", source_count={"public.a": 2})


def _payload(wrapped: object) -> object:
    """What a JSON parameter holds: peewee's fallback wrapper (`.value`) before the
    control database is set up, psycopg2's adapter (`.adapted`) once it is."""
    return wrapped.value if hasattr(wrapped, "value") else wrapped.adapted  # type: ignore[attr-defined]


def test_the_column_writes_models_as_the_json_they_set():
    assert _payload(Job.facts.db_value(PreflightResult(source_address="192.0.2.7"))) == {
        "source_address": "192.0.2.7"
    }
    assert _payload(Job.facts.db_value(JobFacts(upload_deleted=True))) == {"upload_deleted": True}
    assert _payload(Job.facts.db_value({"preflight": {}})) == {
        "preflight": {}
    }  # plain JSON, as operators write it
    merged = Job.facts.concat(JobFacts(tool_process=ToolProcess(pgid=1, program="pg_dump")))
    assert _payload(merged.rhs) == {"tool_process": {"pgid": 1, "program": "pg_dump"}}
