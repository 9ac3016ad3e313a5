"""Preflight of a live source: every reason its import would fail, found before anything
changes.

`check_live_source` resolves and checks the source address once, connects to exactly
that address in a read-only session and reads its catalog, then rehearses its schema
(pg_dump --schema-only, read-only) in a throw-away database of the project's cluster.
It writes nothing to the source or the project's database. Its checks come in the
order of `LIVE_CHECKS` (stages.preflight.registry); a failed check is a result, not an
exception: it raises only for a transient problem of our own (the project's cluster
unreachable). The worker runs the same function as its gate before any destructive step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator

from stages.background import Background
from stages.connections.addresses import (
    Resolver,
    SourceHostUnresolvable,
    address_problem,
    pin_address,
    resolve,
)
from stages.connections.deadline import Deadline, SourceTimedOut
from stages.connections.pgurl import SourceURL
from stages.errors import CapyError
from stages.preflight.checks import (
    add_object_warnings,
    check_extensions,
    check_major,
    check_size,
    check_target_empty,
    skip_object_warnings,
)
from stages.preflight.providers import detect_provider
from stages.preflight.registry import LIVE_CHECKS, SCHEMA_REHEARSAL
from stages.preflight.rehearsal import (
    SCHEMA_ARCHIVE,
    Rehearsal,
    RehearsalSetup,
    dump_live_schema,
    rehearse_archive,
    report_rehearsal,
)
from stages.preflight.report import FAIL, PASS, WARN, Preflight, Target
from stages.preflight.sourceinfo import SourceCatalogUnreadable, SourceFacts, read_only_session, read_source
from stages.tools.commands import Cancellation

_SOURCE_CHECKS = ("source_version_compatible", "source_size_within_plan", "extensions_available_on_target")
NO_REHEARSAL = "no throw-away database was offered (a check run without the project's cluster)"


def check_live_source(
    source: SourceURL,
    target: Target,
    *,
    allow_private: bool,
    timeout: int = 10,
    deadline_seconds: float = 20,
    resolver: Resolver = resolve,
    rehearsal: RehearsalSetup | None = None,
    deadline: Deadline | None = None,
) -> Preflight:
    """Run the `LIVE_CHECKS` for a source URL. `report.pinned` is the source with the
    checked address as `hostaddr` (None when it was not allowed): later stages connect
    to exactly that address.

    Resolving, connecting and reading the source together take at most
    `deadline_seconds` (plus the moment a timed-out socket takes to close): a source
    that stops answering fails `source_reachable` saying so, it never holds the caller.
    A caller that passes its own `deadline` may cancel it (`Deadline.cancel`) to end
    the checks at once.
    """
    deadline = deadline or Deadline(total=deadline_seconds, what="the preflight deadline")
    with contextlib.ExitStack() as stack:
        return _check(source, target, allow_private, timeout, deadline, resolver, rehearsal, stack)


def _check(
    source: SourceURL,
    target: Target,
    allow_private: bool,
    timeout: int,
    deadline: Deadline,
    resolver: Resolver,
    rehearsal: RehearsalSetup | None,
    stack: contextlib.ExitStack,
) -> Preflight:
    report = Preflight()
    provider = detect_provider(source.host, source.port, source.user)
    report.source.update(database_size_bytes=None, server_version=None, extensions=[], provider=provider.name)
    facts, refused, blocked = None, False, ""
    dumped: Callable[[], tuple[Rehearsal | None, str]] | None = None
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
        if rehearsal is not None:
            # The rehearsal's schema dump runs while the source is read and checked.
            dumped = stack.enter_context(_schema_dumped_ahead(rehearsal, pinned))
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
        report.not_checked(SCHEMA_REHEARSAL, blocked)
        return report
    # Reached: the rehearsal's database is made while the other checks run and the schema is dumped.
    with rehearsal.sandbox.ahead() if rehearsal is not None else contextlib.nullcontext():
        report.source.update(facts.as_source())
        check_major(report, facts.server_version_num, target, label=facts.version_label)
        check_size(report, facts.database_size_bytes, target, "the source database")
        check_extensions(report, facts.extensions, target, "the source database")
        check_target_empty(report, target)
        add_object_warnings(report, facts.findings)
        _rehearse(report, dumped, target, rehearsal)
    report.in_order(LIVE_CHECKS)
    return report


@contextlib.contextmanager
def _schema_dumped_ahead(
    setup: RehearsalSetup, pinned: SourceURL
) -> Iterator[Callable[[], tuple[Rehearsal | None, str]]]:
    """The rehearsal's `pg_dump --schema-only` of the pinned source, started in the
    background now: it runs while the preflight reads the source's catalog and runs the
    other checks, which take about as long on a small source. Yields the wait for it:
    (None, or the rehearsal's result that says why there is no dump; the folder
    holding `schema.dump`). Leaving the block stops a dump no rehearsal waited for (the
    source was unreachable, an extension is missing) and removes the folder."""
    folder = tempfile.mkdtemp(dir=setup.work_dir, prefix="rehearsal-")
    stop = Cancellation()
    stage = setup.tools.cancellation
    unsubscribe = (
        stage.on_cancel(lambda: stop.cancel(stage.reason or "cancelled"))
        if stage is not None
        else (lambda: None)
    )
    tools = dataclasses.replace(setup.tools, cancellation=stop)
    dumping = Background(
        lambda: dump_live_schema(
            tools,
            pinned,
            os.path.join(folder, SCHEMA_ARCHIVE),
            setup.deadline,
            lock_wait_ms=setup.lock_wait_ms,
        ),
        name="rehearsal-dump",
    )
    try:
        # Interrupted while it waits (a time limit), the preflight stops the dump first.
        yield lambda: (dumping.result(interrupt=lambda: stop.cancel("the preflight was interrupted")), folder)
    finally:
        stop.cancel("the preflight did not rehearse the schema")
        try:
            dumping.settle()
        finally:
            unsubscribe()
            shutil.rmtree(folder, ignore_errors=True)


def _rehearse(
    report: Preflight,
    dumped: Callable[[], tuple[Rehearsal | None, str]] | None,
    target: Target,
    setup: RehearsalSetup | None,
) -> None:
    """`schema_rehearsal` of a live source whose other checks could run."""
    if setup is None or dumped is None:
        report.not_checked(SCHEMA_REHEARSAL, NO_REHEARSAL)
        return
    extensions = next(check for check in report.checks if check.name == "extensions_available_on_target")
    if extensions.status == FAIL:
        report.not_checked(
            SCHEMA_REHEARSAL,
            "the source uses extensions the project cannot have (see extensions_available_on_target)",
        )
        return
    failed, folder = dumped()
    result = failed
    if result is None:
        result = rehearse_archive(
            setup.tools,
            os.path.join(folder, SCHEMA_ARCHIVE),
            setup.sandbox,
            folder,
            setup.deadline,
            allowed_extensions=set(target.allowlist) | {"plpgsql"},
        )
    report_rehearsal(report, result, full=setup.full)


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
