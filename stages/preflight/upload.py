"""Preflight of an uploaded dump: every reason its import would fail, found from the
first bytes of the upload before anything changes.

`check_upload_head` reads a prefix of the upload (an archive's table of contents comes
first; a plain script is read for the objects in the prefix) and, for an archive,
rehearses its schema in a throw-away database of the project's cluster. Its checks come
in the order of `UPLOAD_CHECKS` (stages.preflight.registry).
"""

from __future__ import annotations

import os
import tempfile

from stages.dumps.archivecheck import cut_short_in_head
from stages.dumps.contents import MAX_SQL_TEXT, DumpContents, list_archive, read_sql_file, read_tail
from stages.dumps.formats import DumpInfo, detect_format
from stages.dumps.gate import DumpTooNew, check_archive_readable, check_versions
from stages.errors import CommandFailed, TransientError, UnrecognizedDump
from stages.preflight.checks import (
    add_object_warnings,
    check_extensions,
    check_size,
    check_target_empty,
    skip_object_warnings,
)
from stages.preflight.plainrehearsal import rehearse_plain
from stages.preflight.registry import SCHEMA_REHEARSAL, UPLOAD_CHECKS
from stages.preflight.rehearsal import RehearsalSetup, rehearse_archive, report_rehearsal
from stages.preflight.report import FAIL, PASS, WARN, Check, Preflight, Target, human_bytes
from stages.tools.commands import PgTools

NO_REHEARSAL = "no throw-away database was offered (a check run without the project's cluster)"


def _not_empty(report: Preflight, size: int) -> None:
    if size == 0:
        report.add("upload_not_empty", FAIL, "the uploaded object is empty; upload the pg_dump output again")
    else:
        shown = human_bytes(size)
        exact = "" if shown == f"{size} bytes" else f" ({size} bytes)"
        report.add("upload_not_empty", PASS, f"the upload holds {shown}{exact}")


def check_upload_head(
    head_path: str,
    total_size: int,
    target: Target,
    tools: PgTools,
    *,
    max_text: int = MAX_SQL_TEXT,
    rehearsal: RehearsalSetup | None = None,
    tail_path: str | None = None,
) -> Preflight:
    """Run the `UPLOAD_CHECKS` on the first bytes of an upload of `total_size` bytes.

    `head_path` holds a prefix of the upload (all of it when it is small). An archive's
    table of contents comes first, so the target's `pg_restore --list` reads it from
    the prefix; a plain SQL dump is read for the objects in the prefix, at most
    `max_text` bytes of SQL once decompressed. `dump_read_in_full` says what was read.
    With `rehearsal`, an archive's schema is rehearsed (`schema_rehearsal`) by
    `rehearsal.deadline`. `tail_path`, if given, holds the upload's last bytes: an
    uncompressed pg_dump script without its footer there is cut short
    (`stages.dumps.contents.read_tail`).
    """
    report = Preflight()
    head_bytes = os.path.getsize(head_path)
    complete = head_bytes >= total_size
    report.source.update(
        database_size_bytes=None, server_version=None, extensions=[], upload_bytes=total_size
    )
    _not_empty(report, total_size)
    info, blocked = None, ""
    if total_size == 0:
        blocked = "the upload is empty"
        report.not_checked("dump_format_recognized", blocked)
    else:
        try:
            info = detect_format(head_path)
        except UnrecognizedDump as err:
            report.add("dump_format_recognized", FAIL, err.message)
            blocked = "the upload is not a pg_dump output (see dump_format_recognized)"
    if info is not None and (cut := cut_short_in_head(head_path, info.format, total_size)):
        report.add("dump_format_recognized", FAIL, cut)
        info, blocked = None, "the upload is cut short (see dump_format_recognized)"
    contents = None
    if info is not None:
        report.add("dump_format_recognized", PASS, _describe_format(info))
        report.source.update(
            format=info.format,
            archive_version=info.archive_version,
            dumped_by=info.dumped_by,
            dumped_from=info.dumped_from,
            server_version=info.dumped_from,
        )
        contents, blocked = _dump_version(
            report, head_path, info, target, tools, complete, max_text, tail_path
        )
    else:
        report.not_checked("source_version_compatible", blocked)
    check_size(report, total_size, target, "the upload")
    if contents is None:
        report.not_checked("extensions_available_on_target", blocked)
        check_target_empty(report, target)
        skip_object_warnings(report, blocked)
        _read_in_full(report, info, None, head_bytes, total_size, blocked)
        report.not_checked(SCHEMA_REHEARSAL, blocked or "the dump's table of contents was not read")
        return report
    report.source.update(
        extensions=[{"name": name, "version": None} for name in contents.extensions],
        schemas=contents.schemas,
        table_count=contents.table_count,
        large_objects=contents.large_objects,
        event_triggers=contents.event_triggers,
        untrusted_languages=contents.untrusted_languages,
        foreign_servers=contents.foreign_servers,
        publications=contents.publications,
        subscriptions=contents.subscriptions,
    )
    # A plain script cut short may hold more objects further on; say what was read.
    partial = "" if contents.complete else f" in the first {human_bytes(head_bytes)} of the upload"
    what = "the dump" if contents.complete else f"the first {human_bytes(head_bytes)} of the dump"
    check_extensions(report, contents.extension_list(), target, what)
    check_target_empty(report, target)
    add_object_warnings(report, contents.findings(), partial=partial)
    _read_in_full(report, info, contents, head_bytes, total_size, blocked)
    _rehearse(
        report, head_path, info, target, rehearsal, complete=head_bytes >= total_size, max_text=max_text
    )
    report.in_order(UPLOAD_CHECKS)
    return report


def _rehearse(
    report: Preflight,
    head_path: str,
    info: DumpInfo | None,
    target: Target,
    setup: RehearsalSetup | None,
    *,
    complete: bool,
    max_text: int,
) -> None:
    """`schema_rehearsal` of an upload whose contents could be read: an archive's whole
    schema (its table of contents is in the head), a plain script's objects in the head."""
    extensions = next(check for check in report.checks if check.name == "extensions_available_on_target")
    allowed = set(target.allowlist) | {"plpgsql"}
    if info is None:
        report.not_checked(SCHEMA_REHEARSAL, "the upload is not a pg_dump output")
    elif setup is None:
        report.not_checked(SCHEMA_REHEARSAL, NO_REHEARSAL)
    elif extensions.status == FAIL:
        report.not_checked(
            SCHEMA_REHEARSAL,
            "the dump uses extensions the project cannot have (see extensions_available_on_target)",
        )
    elif info.format in ("custom", "tar"):
        with tempfile.TemporaryDirectory(dir=setup.work_dir, prefix="rehearsal-") as folder:
            result = rehearse_archive(
                setup.tools, head_path, setup.sandbox, folder, setup.deadline, allowed_extensions=allowed
            )
        report_rehearsal(report, result, full=setup.full)
    else:
        with tempfile.TemporaryDirectory(dir=setup.work_dir, prefix="rehearsal-") as folder:
            result = rehearse_plain(
                head_path,
                setup.sandbox,
                folder,
                setup.deadline,
                gzipped=info.format == "gzip-plain",
                complete=complete,
                max_bytes=max_text,
                allowed_extensions=allowed,
            )
        scope = "" if complete else f" in the first {human_bytes(os.path.getsize(head_path))} of the dump"
        report_rehearsal(report, result, full=setup.full, scope=scope)


def _read_in_full(
    report: Preflight,
    info: DumpInfo | None,
    contents: DumpContents | None,
    head_bytes: int,
    total_size: int,
    blocked: str,
) -> None:
    """`dump_read_in_full`: what preflight read of the upload, which the import reads whole.

    The synchronous preflight reads a bounded head (CAPY_PREFLIGHT_HEAD_BYTES, and at
    most CAPY_PREFLIGHT_TEXT_BYTES of SQL decompressed from it): objects further on in
    a plain dump are only seen by the import.
    """
    name = "dump_read_in_full"
    whole = head_bytes >= total_size
    later = "; the import reads it whole and checks what comes after"
    if info is None or (contents is None and blocked != _TOC_NOT_IN_HEAD):
        report.not_checked(name, blocked)
    elif contents is None:
        report.add(
            name,
            WARN,
            f"preflight read the first {human_bytes(head_bytes)} of the dump, which does not hold its whole "
            f"table of contents{later}",
        )
    elif info.format in ("custom", "tar"):
        if whole:
            report.add(name, PASS, "preflight read the whole upload")
        else:
            report.add(
                name,
                PASS,
                f"preflight read the first {human_bytes(head_bytes)} of the {human_bytes(total_size)} upload, "
                "which holds the archive's whole table of contents; the import reads it whole",
            )
    elif contents.complete:
        report.add(name, PASS, "preflight read the whole upload")
    elif info.format == "gzip-plain":
        report.add(
            name,
            WARN,
            f"preflight read the first {human_bytes(contents.text_bytes)} of the dump (decompressed from the first "
            f"{human_bytes(head_bytes)} of the {human_bytes(total_size)} upload){later}",
        )
    else:
        report.add(
            name,
            WARN,
            f"preflight read the first {human_bytes(contents.text_bytes)} of the dump "
            f"({human_bytes(total_size)}){later}",
        )


def _describe_format(info: DumpInfo) -> str:
    kind = {
        "custom": "a pg_dump custom-format archive (-Fc)",
        "tar": "a pg_dump tar archive (-Ft)",
        "plain": "a plain SQL script (-Fp)",
        "gzip-plain": "a gzip-compressed plain SQL script",
    }[info.format]
    about = []
    if info.archive_version:
        about.append(f"archive format {info.archive_version}")
    if info.dumped_by:
        about.append(f"made by pg_dump {info.dumped_by}")
    if info.dumped_from:
        about.append(f"from PostgreSQL {info.dumped_from}")
    return f"the upload is {kind}" + (f", {', '.join(about)}" if about else "")


_TOC_NOT_IN_HEAD = (
    "the dump's table of contents is not in the part preflight reads (see source_version_compatible)"
)


def _dump_version(
    report: Preflight,
    head_path: str,
    info: DumpInfo,
    target: Target,
    tools: PgTools,
    complete: bool,
    max_text: int,
    tail_path: str | None = None,
) -> tuple[DumpContents | None, str]:
    """`source_version_compatible` for a dump, and what its head contains; or None and
    why the contents were not read."""
    name = "source_version_compatible"
    try:
        check_versions(info, target.major)
    except DumpTooNew as err:
        report.add(name, FAIL, err.message)
        return None, f"the dump cannot be restored into PostgreSQL {target.major} (see {name})"
    made = _provenance(info)
    if info.format in ("plain", "gzip-plain"):
        contents = read_sql_file(
            head_path, gzipped=info.format == "gzip-plain", complete=complete, max_text=max_text
        )
        if tail_path and not complete and info.format == "plain":
            read_tail(contents, tail_path)
        if (
            contents.refusal
        ):  # how the script was made rules it out (stages.dumps.plaindump): the format fails
            at = next(i for i, check in enumerate(report.checks) if check.name == "dump_format_recognized")
            report.checks[at] = Check("dump_format_recognized", FAIL, contents.refusal)
        if info.dumped_from is None:
            report.add(
                name,
                WARN,
                "the SQL script does not say which PostgreSQL version it was dumped from; it is "
                f"restored with PostgreSQL {target.major}'s psql, which stops at the first "
                "statement it cannot run",
            )
        else:
            report.add(name, PASS, f"{made} can be restored into PostgreSQL {target.major}")
        return contents, ""
    try:
        check_archive_readable(tools, head_path, info, target.major)
    except TransientError:
        raise
    except CommandFailed as err:
        if not complete and _ran_out(err):
            report.add(
                name,
                WARN,
                f"the dump's table of contents is larger than the first {human_bytes(os.path.getsize(head_path))} "
                "that preflight reads; the import reads it whole before restoring anything",
            )
            return None, _TOC_NOT_IN_HEAD
        report.add(name, FAIL, err.message)
        return None, f"PostgreSQL {target.major}'s pg_restore cannot read the dump (see {name})"
    contents = list_archive(tools, head_path)
    report.add(
        name,
        PASS,
        f"{made} (archive format {info.archive_version}) can be read by PostgreSQL {target.major}'s pg_restore",
    )
    return contents, ""


def _provenance(info: DumpInfo) -> str:
    """ "a dump of PostgreSQL 15.4 made by pg_dump 15.4", from what the dump says."""
    text = "a dump"
    if info.dumped_from:
        text += f" of PostgreSQL {_short(info.dumped_from)}"
    if info.dumped_by:
        text += f" made by pg_dump {_short(info.dumped_by)}"
    return text


def _short(version: str) -> str:
    """ "15.4" from "15.4 (Debian 15.4-1.pgdg120+1)"."""
    return version.split(" ", 1)[0]


def _ran_out(err: CommandFailed) -> bool:
    """pg_restore stopped at the end of a cut-short head, not at damage."""
    text = err.stderr_tail.lower()
    return "end of file" in text or "too short" in text
