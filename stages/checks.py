"""The vocabulary of preflight: a `Check`, the `Preflight` report, the `Target`, and the
checks that live sources and uploaded dumps share.

A check that could not run because an earlier one failed (the source unreachable, the
upload not a dump) is still listed, as `warn` with a detail starting "not checked:",
so the list has the same names in the same order every time and `ok` is decided by
the checks that did run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stages.errors import CapyError, PermanentError, TransientError
from stages.extensions import DEFAULT_EXTENSION_ALLOWLIST, Extension, judge_extensions
from stages.pgurl import SourceURL

PASS, WARN, FAIL = "pass", "warn", "fail"
# pg_dump (up to 17 at least) dumps servers from 9.2 on (pg_dump.c: "aborting because
# of server version mismatch" below it). As server_version_num.
OLDEST_DUMPABLE = 90200


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    transient: bool = False  # a failure that may pass on its own (not shown to users)
    # What a transient failure means when every attempt meets it (TransientError.when_repeated).
    when_repeated: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Target:
    """What preflight needs to know about the project's side of the import.

    `is_empty` and `available_extensions` (name -> default_version, as in the target
    cluster's `pg_available_extensions`) are called only when a check needs them.
    Without `available_extensions` the extension check applies the allowlist alone.
    """

    major: int
    storage_limit_bytes: int
    recreate: bool
    is_empty: Callable[[], bool]
    version: str = ""
    allowlist: tuple[str, ...] = DEFAULT_EXTENSION_ALLOWLIST
    available_extensions: Callable[[], dict[str, str]] | None = None

    @property
    def server_version(self) -> str:
        return self.version or str(self.major)


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    pinned: SourceURL | None = None

    @property
    def ok(self) -> bool:
        """False iff some check failed."""
        return all(check.status != FAIL for check in self.checks)

    def add(
        self, name: str, status: str, detail: str, *, transient: bool = False, when_repeated: str | None = None
    ) -> None:
        self.checks.append(Check(name, status, detail, transient, when_repeated))

    def add_error(self, name: str, err: CapyError) -> None:
        """A failed check whose detail is `err`: transient (with what it means when it
        repeats) if the error is."""
        repeated = err.when_repeated if isinstance(err, TransientError) else None
        self.add(name, FAIL, err.message, transient=isinstance(err, TransientError), when_repeated=repeated)

    def not_checked(self, name: str, why: str) -> None:
        self.add(name, WARN, f"not checked: {why}")

    def first_failure(self) -> Check | None:
        return next((check for check in self.checks if check.status == FAIL), None)

    def raise_for_failure(self) -> None:
        """Raise with the first failing check's detail, if any: TransientError when
        that failure may pass (a timeout), PermanentError otherwise."""
        failed = self.first_failure()
        if failed is None:
            return
        message = f"preflight check {failed.name} failed: {failed.detail}"
        if not failed.transient:
            raise PermanentError(message)
        repeated = failed.when_repeated and f"preflight check {failed.name} failed: {failed.when_repeated}"
        raise TransientError(message, when_repeated=repeated or None)

    def as_response(self, target: Target) -> dict[str, Any]:
        """The `preflight` object of the HTTP API (SPEC.md, HTTP API item 3)."""
        return {
            "checks": [check.as_dict() for check in self.checks],
            "ok": self.ok,
            "source": self.source,
            "storage_limit_bytes": target.storage_limit_bytes,
            "target_version": target.server_version,
        }


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def check_size(report: Preflight, size: int, target: Target, what: str) -> None:
    """`source_size_within_plan`: fail above the storage limit, warn above 80 % of it."""
    limit = target.storage_limit_bytes
    share = f"{human_bytes(size)} of the project's {human_bytes(limit)} storage limit"
    percent = f"{100 * size // limit} %" if limit > 0 else "all"
    if size > limit:
        report.add(
            "source_size_within_plan",
            FAIL,
            f"{what} is {share} ({size} > {limit} bytes); raise the project's storage limit or import less data",
        )
    elif size * 5 > limit * 4:
        report.add(
            "source_size_within_plan",
            WARN,
            f"{what} uses {share} ({percent}), over 80 %; the imported database leaves little room to grow",
        )
    else:
        report.add("source_size_within_plan", PASS, f"{what} uses {share} ({percent})")


def check_target_empty(report: Preflight, target: Target) -> None:
    """`target_database_empty`: with recreate false the project's database must be empty."""
    empty = target.is_empty()
    if empty:
        report.add("target_database_empty", PASS, "the project's database is empty")
    elif target.recreate:
        report.add(
            "target_database_empty",
            PASS,
            'the project\'s database holds objects; "recreate": true replaces it (the current '
            "database is kept aside, renamed)",
        )
    else:
        report.add(
            "target_database_empty",
            FAIL,
            "the project's database already holds tables or other objects; send "
            '"recreate": true to replace them (the current database is kept aside), '
            "or import into an empty project",
        )


def check_major(report: Preflight, version_num: int, target: Target, *, label: str) -> None:
    """`source_version_compatible` for a live source (`version_num` as in
    server_version_num, `label` the version a person reads, "15.4")."""
    major = version_num // 10000 if version_num >= 100000 else version_num // 100
    if version_num >= 100000 and major > target.major:
        report.add(
            "source_version_compatible",
            FAIL,
            f"the source runs PostgreSQL {label}, newer than the project's PostgreSQL "
            f"{target.major}; imports cannot downgrade. Use a project on a cluster "
            f"running PostgreSQL {major} or later",
        )
    elif version_num < OLDEST_DUMPABLE:
        report.add(
            "source_version_compatible",
            FAIL,
            f"the source runs PostgreSQL {label}; pg_dump {target.major} dumps PostgreSQL 9.2 "
            "and later only. Upgrade the source first",
        )
    else:
        report.add(
            "source_version_compatible",
            PASS,
            f"source PostgreSQL {label} can be restored into PostgreSQL {target.major}",
        )


def check_extensions(report: Preflight, extensions: Sequence[Extension], target: Target, what: str) -> None:
    """`extensions_available_on_target`: allowlisted, installable, not older on the target."""
    available = target.available_extensions() if target.available_extensions is not None else None
    verdict = judge_extensions(extensions, target.allowlist, available)
    status = FAIL if verdict.failed else WARN if verdict.older_on_target else PASS
    report.add("extensions_available_on_target", status, verdict.detail(what))


@dataclass(frozen=True)
class Findings:
    """Objects a managed target may not restore as they are. None: not known, and
    `errors` may say why (keyed by field name)."""

    event_triggers: list[str] | None = None
    untrusted_languages: list[str] | None = None
    large_objects: int | None = None
    foreign_servers: list[str] | None = None
    publications: list[str] | None = None
    subscriptions: list[str] | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def why_unknown(self, *fields: str) -> str:
        reasons = [self.errors[name] for name in fields if name in self.errors]
        because = f" ({'; '.join(reasons)})" if reasons else ""
        return f"the source's catalog could not be read for it{because}"


OBJECT_CHECKS = (
    "no_event_triggers",
    "no_untrusted_languages",
    "no_large_objects",
    "no_foreign_servers",
    "no_logical_replication",
)


def add_object_warnings(report: Preflight, findings: Findings, *, partial: str = "") -> None:
    """The warnings for objects a managed target cannot (or can only slowly) restore.

    `partial` qualifies a "none found" when only part of the source was read (the head
    of a plain SQL dump), e.g. " in the first 32.0 MiB of the upload".
    """

    def names(values: list[str]) -> str:
        return ", ".join(values)

    why = findings.why_unknown
    if findings.event_triggers is None:
        report.not_checked("no_event_triggers", why("event_triggers"))
    elif findings.event_triggers:
        report.add(
            "no_event_triggers",
            WARN,
            f"event triggers {names(findings.event_triggers)}: creating them needs superuser, which "
            "a managed database does not grant, so the import leaves them out; recreate what they "
            "do another way after the import",
        )
    else:
        report.add("no_event_triggers", PASS, f"no event triggers{partial}")

    if findings.untrusted_languages is None:
        report.not_checked("no_untrusted_languages", why("untrusted_languages"))
    elif findings.untrusted_languages:
        report.add(
            "no_untrusted_languages",
            WARN,
            f"untrusted procedural languages {names(findings.untrusted_languages)}: creating them "
            "needs superuser, which a managed database does not grant, so the import leaves them "
            "out and functions written in them cannot be restored; rewrite those functions in a "
            "trusted language such as plpgsql",
        )
    else:
        report.add("no_untrusted_languages", PASS, f"no untrusted procedural languages{partial}")

    if findings.large_objects is None:
        report.not_checked("no_large_objects", why("large_objects"))
    elif findings.large_objects:
        report.add(
            "no_large_objects",
            WARN,
            f"{findings.large_objects} large objects: they are restored one by one, which is slow "
            "when there are many, and their data counts towards the storage limit",
        )
    else:
        report.add("no_large_objects", PASS, f"no large objects{partial}")

    if findings.foreign_servers is None:
        report.not_checked("no_foreign_servers", why("foreign_servers"))
    elif findings.foreign_servers:
        report.add(
            "no_foreign_servers",
            WARN,
            f"foreign servers {names(findings.foreign_servers)}: they point at data outside this "
            "database; the import leaves out user mappings (they hold the source's credentials) "
            "and foreign-data wrappers that need superuser",
        )
    else:
        report.add("no_foreign_servers", PASS, f"no foreign servers{partial}")

    if findings.publications is None or findings.subscriptions is None:
        report.not_checked("no_logical_replication", why("publications", "subscriptions"))
    elif findings.publications or findings.subscriptions:
        parts = []
        if findings.publications:
            parts.append(f"publications {names(findings.publications)}")
        if findings.subscriptions:
            parts.append(f"subscriptions {names(findings.subscriptions)}")
        report.add(
            "no_logical_replication",
            WARN,
            f"{' and '.join(parts)}: logical replication is not carried over; the import leaves "
            "out subscriptions (they need superuser), and publications have no subscribers after it",
        )
    else:
        report.add("no_logical_replication", PASS, f"no publications or subscriptions{partial}")


def skip_object_warnings(report: Preflight, why: str) -> None:
    for name in OBJECT_CHECKS:
        report.not_checked(name, why)
