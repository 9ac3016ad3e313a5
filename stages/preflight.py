"""Preflight: every reason an import would fail, found before anything changes.

`check_live_source` resolves and checks the source address once, connects to exactly
that address in a read-only session and reads its catalog; `check_upload_head` reads
the first bytes of an uploaded dump. Neither of them writes anything to the source, the
target or storage. Each returns a `Preflight` whose checks come in a fixed order (see
`LIVE_CHECKS`, `UPLOAD_CHECKS`); a failed check is a result, not an exception: they
raise only for a transient problem of our own (the project's cluster unreachable).
The worker runs the same functions as its gate before any destructive step.
"""

from __future__ import annotations

import os
import threading

from stages.addresses import Resolver, SourceHostUnresolvable, address_problem, pin_address, resolve
from stages.checks import (
    FAIL,
    OBJECT_CHECKS,
    PASS,
    WARN,
    Check,
    Preflight,
    Target,
    add_object_warnings,
    check_extensions,
    check_major,
    check_size,
    check_target_empty,
    human_bytes,
    skip_object_warnings,
)
from stages.commands import PgTools
from stages.deadline import Deadline, SourceTimedOut
from stages.dumpcontents import MAX_SQL_TEXT, DumpContents, list_archive, read_sql_file, read_tail
from stages.dumpformat import DumpInfo, detect_format
from stages.dumpgate import DumpTooNew, check_archive_readable, check_versions
from stages.errors import CapyError, CommandFailed, TransientError, UnrecognizedDump
from stages.pgurl import SourceURL
from stages.providers import detect_provider
from stages.sourceinfo import SourceCatalogUnreadable, SourceFacts, read_only_session, read_source

__all__ = [
    "FAIL",
    "LIVE_CHECKS",
    "PASS",
    "UPLOAD_CHECKS",
    "WARN",
    "Check",
    "Preflight",
    "Target",
    "check_live_source",
    "check_size",
    "check_target_empty",
    "check_upload_head",
]

LIVE_CHECKS = (
    "source_address_allowed",
    "source_reachable",
    "not_a_transaction_pooler",
    "source_version_compatible",
    "source_size_within_plan",
    "extensions_available_on_target",
    "target_database_empty",
    *OBJECT_CHECKS,
)
UPLOAD_CHECKS = (
    "upload_not_empty",
    "dump_format_recognized",
    "source_version_compatible",
    "source_size_within_plan",
    "extensions_available_on_target",
    "target_database_empty",
    *OBJECT_CHECKS,
    "dump_read_in_full",
)
_SOURCE_CHECKS = ("source_version_compatible", "source_size_within_plan", "extensions_available_on_target")


def check_live_source(
    source: SourceURL,
    target: Target,
    *,
    allow_private: bool,
    timeout: int = 10,
    deadline_seconds: float = 20,
    resolver: Resolver = resolve,
) -> Preflight:
    """Run the `LIVE_CHECKS` for a source URL. `report.pinned` is the source with the
    checked address as `hostaddr` (None when it was not allowed): later stages connect
    to exactly that address.

    Resolving, connecting and reading the source together take at most
    `deadline_seconds` (plus the moment a timed-out socket takes to close): a source
    that stops answering fails `source_reachable` saying so, it never holds the caller.
    """
    deadline = Deadline(total=deadline_seconds, what="the preflight deadline")
    report = Preflight()
    provider = detect_provider(source.host, source.port, source.user)
    report.source.update(database_size_bytes=None, server_version=None, extensions=[], provider=provider.name)
    facts, refused, blocked = None, False, ""
    try:
        pinned = pin_address(
            source, allow_private=allow_private, resolver=bounded_resolver(resolver, deadline)
        )
    except (SourceHostUnresolvable, SourceTimedOut) as err:
        report.not_checked(
            "source_address_allowed", "the source host does not resolve (see source_reachable)"
        )
        report.add_error("source_reachable", err)
        blocked = "the source database could not be reached (see source_reachable)"
    except CapyError as err:
        report.add("source_address_allowed", FAIL, err.message)
        blocked = "the source address is not allowed (see source_address_allowed)"
        report.not_checked("source_reachable", blocked)
    else:
        report.pinned = pinned
        _address_allowed(report, source, pinned.params["hostaddr"])
        try:
            with read_only_session(pinned, timeout=timeout, deadline=deadline) as (conn, refused):
                facts = read_source(conn)
            report.add("source_reachable", PASS, f"connected to {source.redacted()} as {source.user}")
        except SourceCatalogUnreadable as err:
            report.add(
                "source_reachable",
                FAIL,
                f"connected to {source.redacted()} as {source.user}, but could not read its catalog "
                f"({err.message}); the user needs to be able to read the system catalogs",
            )
            blocked = "the source's catalog could not be read (see source_reachable)"
        except CapyError as err:
            # A timeout, a busy or a restarting server may pass: the worker's gate retries those.
            report.add_error("source_reachable", err)
            blocked = "the source database could not be reached (see source_reachable)"
    _pooler(report, source, provider.pooler, facts, refused, blocked)
    if facts is None:
        for name in _SOURCE_CHECKS:
            report.not_checked(name, blocked)
        check_target_empty(report, target)
        skip_object_warnings(report, blocked)
        return report
    report.source.update(facts.as_source())
    check_major(report, facts.server_version_num, target, label=facts.version_label)
    check_size(report, facts.database_size_bytes, target, "the source database")
    check_extensions(report, facts.extensions, target, "the source database")
    check_target_empty(report, target)
    add_object_warnings(report, facts.findings)
    return report


def bounded_resolver(resolver: Resolver, deadline: Deadline) -> Resolver:
    """`resolver`, given what is left of `deadline`: a DNS server that does not answer
    fails the lookup (SourceTimedOut) instead of holding the caller. The lookup thread
    itself ends when the system resolver gives up."""

    def lookup(host: str, port: int) -> list[str]:
        outcome: list[list[str] | BaseException] = []

        def run() -> None:
            try:
                outcome.append(resolver(host, port))
            except BaseException as err:  # handed to the caller below
                outcome.append(err)

        thread = threading.Thread(target=run, name=f"resolve {host}", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline.remaining()))
        if not outcome:
            raise SourceTimedOut(
                f"the source host {host!r} did not resolve within {deadline.limit()}; "
                "check the host name, or try again if its DNS is slow"
            )
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    return lookup


def _address_allowed(report: Preflight, source: SourceURL, address: str) -> None:
    problem = address_problem(address)
    pinned = "; the import connects to that address only"
    if problem:
        detail = f"{source.host} resolves to {address}, {problem}, allowed by the operator (CAPY_ALLOW_PRIVATE_SOURCES)"
    else:
        detail = f"{source.host} resolves to {address}, a public address"
    report.add("source_address_allowed", PASS, detail + pinned)


def _pooler(
    report: Preflight,
    source: SourceURL,
    by_host: str | None,
    facts: SourceFacts | None,
    refused: bool,
    blocked: str,
) -> None:
    """`not_a_transaction_pooler`: known pooler addresses, then what the session showed."""
    name = "not_a_transaction_pooler"
    direct = "; use the direct (session) connection string of the database"
    where = f"{source.host}:{source.port}"
    if by_host:
        report.add(name, FAIL, f"{by_host}: pg_dump needs one session for its consistent snapshot")
    elif facts is None:
        report.not_checked(name, f"{where} is not a known pooler address, but {blocked}")
    elif facts.session == "transaction-pooled":
        report.add(
            name,
            FAIL,
            f"{where} is a transaction pooler: two consecutive transactions ran in different "
            f"server sessions, so pg_dump could not keep one snapshot{direct}",
        )
    elif facts.session == "proxied" or refused:
        why = (
            "it refused the startup parameter options, as PgBouncer does"
            if refused
            else "the backend pid it announced at login is not the pid of the session that answers"
        )
        report.add(
            name,
            WARN,
            f"{where} answers through a connection pooler or proxy ({why}); if it pools "
            f"transactions the import will fail{direct}",
        )
    else:
        report.add(
            name,
            PASS,
            f"{where} is not a known pooler address, and the connection kept one server session",
        )


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
    tail_path: str | None = None,
) -> Preflight:
    """Run the `UPLOAD_CHECKS` on the first bytes of an upload of `total_size` bytes.

    `head_path` holds a prefix of the upload (all of it when it is small). An archive's
    table of contents comes first, so the target's `pg_restore --list` reads it from
    the prefix; a plain SQL dump is read for the objects in the prefix, at most
    `max_text` bytes of SQL once decompressed. `dump_read_in_full` says what was read.
    `tail_path`, if given, holds the upload's last bytes: an uncompressed pg_dump script
    without its footer there is cut short (`stages.dumpcontents.read_tail`).
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
        contents, blocked = _dump_version(report, head_path, info, target, tools, complete, max_text, tail_path)
    else:
        report.not_checked("source_version_compatible", blocked)
    check_size(report, total_size, target, "the upload")
    if contents is None:
        report.not_checked("extensions_available_on_target", blocked)
        check_target_empty(report, target)
        skip_object_warnings(report, blocked)
        _read_in_full(report, info, None, head_bytes, total_size, blocked)
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
    return report


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


_TOC_NOT_IN_HEAD = "the dump's table of contents is not in the part preflight reads (see source_version_compatible)"


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
        contents = read_sql_file(head_path, gzipped=info.format == "gzip-plain", complete=complete, max_text=max_text)
        if tail_path and not complete and info.format == "plain":
            read_tail(contents, tail_path)
        if contents.refusal:  # how the script was made rules it out (stages.plaindump): the format fails
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
