"""The checks that live sources and uploaded dumps share: size, version, extensions,
target emptiness, and the objects a managed target cannot restore."""

from __future__ import annotations

from collections.abc import Sequence

from stages.connections.connect import major_of
from stages.preflight.extensions import Extension, judge_extensions
from stages.preflight.registry import OBJECT_CHECKS
from stages.preflight.report import (
    FAIL,
    OLDEST_DUMPABLE,
    PASS,
    WARN,
    Findings,
    Preflight,
    Target,
    human_bytes,
)


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
    major = major_of(version_num)
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
