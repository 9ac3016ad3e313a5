"""Preflight checks: every reason an import would fail, found before anything changes.

`check_live_source` connects read-only, reads what it needs and changes nothing.
Each check yields a `Check` with `pass`, `warn` or `fail` and a detail a person can
act on; `Preflight.ok` is false iff a check failed. The worker runs the same function
as its gate before any destructive step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.connect import connection, server_major
from stages.errors import CapyError, PermanentError
from stages.pgurl import SourceURL, pin_address

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    pinned: SourceURL | None = None

    @property
    def ok(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def first_failure(self) -> Check | None:
        return next((check for check in self.checks if check.status == FAIL), None)

    def raise_for_failure(self) -> None:
        """Raise PermanentError with the first failing check's detail, if any."""
        failed = self.first_failure()
        if failed:
            raise PermanentError(f"preflight check {failed.name} failed: {failed.detail}")


@dataclass(frozen=True)
class Target:
    """What preflight needs to know about the project's side of the import."""

    major: int
    storage_limit_bytes: int
    recreate: bool
    is_empty: Callable[[], bool]


def check_target_empty(report: Preflight, target: Target) -> None:
    if target.recreate:
        return
    if target.is_empty():
        report.add("target_database_empty", PASS, "the project's database is empty")
    else:
        report.add(
            "target_database_empty",
            FAIL,
            "the project's database already holds tables or other objects; send "
            '"recreate": true to replace them (the current database is kept aside), '
            "or import into an empty project",
        )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def check_size(report: Preflight, size: int, target: Target, what: str) -> None:
    """`source_size_within_plan`: fail above the storage limit, warn above 80 %."""
    limit = target.storage_limit_bytes
    share = f"{_human(size)} of the project's {_human(limit)} storage limit"
    if size > limit:
        report.add(
            "source_size_within_plan",
            FAIL,
            f"{what} is {share} ({size} > {limit} bytes); raise the project's storage limit or import less data",
        )
    elif size > 0.8 * limit:
        report.add("source_size_within_plan", WARN, f"{what} uses {share}, over 80 %")
    else:
        report.add("source_size_within_plan", PASS, f"{what} uses {share}")


def check_upload(size: int, target: Target) -> Preflight:
    """Checks for an uploaded dump before it is downloaded: its size, the target."""
    report = Preflight()
    report.source.update(upload_bytes=size)
    if size == 0:
        report.add("upload_not_empty", FAIL, "the uploaded object is empty; upload the pg_dump output again")
    check_size(report, size, target, "the upload")
    check_target_empty(report, target)
    return report


def check_live_source(
    source: SourceURL,
    target: Target,
    *,
    allow_private: bool,
    timeout: int = 10,
) -> Preflight:
    """Run the checks for a live source URL and return the report (never raises
    for a failed check; raises only for a bug or a transient problem of our own)."""
    report = Preflight()
    try:
        pinned = pin_address(source, allow_private=allow_private)
    except CapyError as err:
        report.add("source_address_allowed", FAIL, err.message)
        check_target_empty(report, target)
        return report
    address = pinned.params["hostaddr"]
    report.add(
        "source_address_allowed",
        PASS,
        f"{source.host} resolves to {address}"
        + (" (private addresses are allowed by the operator)" if allow_private else ""),
    )
    report.pinned = pinned
    try:
        with connection(pinned, timeout=timeout, options="-c default_transaction_read_only=on") as conn:
            report.add("source_reachable", PASS, f"connected to {source.redacted()} as {source.user}")
            _describe_source(conn, report)
            major = server_major(conn)
    except CapyError as err:
        report.add("source_reachable", FAIL, err.message)
        check_target_empty(report, target)
        return report
    if major > target.major:
        report.add(
            "source_version_compatible",
            FAIL,
            f"the source runs PostgreSQL {major}, newer than the project's PostgreSQL "
            f"{target.major}; imports cannot downgrade. Use a project on a cluster "
            f"running PostgreSQL {major} or later",
        )
    else:
        report.add(
            "source_version_compatible",
            PASS,
            f"source PostgreSQL {major} can be restored into PostgreSQL {target.major}",
        )
    check_target_empty(report, target)
    return report


def _describe_source(conn: Any, report: Preflight) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), pg_database_size(current_database())")
        version, size = cur.fetchone()
        cur.execute("SELECT extname, extversion FROM pg_extension ORDER BY extname")
        extensions = [{"name": name, "version": ver} for name, ver in cur.fetchall()]
    report.source.update(server_version=version, database_size_bytes=int(size), extensions=extensions)
