"""The ordered registry of preflight's named checks: the one list of what preflight
checks, in the order reports show them.

A report always holds every check of its sequence, in this order (a check that could
not run is listed as "not checked: …"), so API clients, the README and the tests read
the names from here. Adding a check is one function (in the module of what it reads)
and one line here; `Preflight.in_order` then places it, and the runners' tests fail
until the function reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

LIVE, UPLOAD = "live", "upload"


@dataclass(frozen=True)
class NamedCheck:
    """A check's stable name (API, README), which sequences run it, and what it asks."""

    name: str
    runs_for: tuple[str, ...]
    question: str


REGISTRY: tuple[NamedCheck, ...] = (
    NamedCheck("upload_not_empty", (UPLOAD,), "does the upload hold any bytes?"),
    NamedCheck("dump_format_recognized", (UPLOAD,), "is it a pg_dump custom, tar or plain output?"),
    NamedCheck("source_address_allowed", (LIVE,), "is every address the host resolves to allowed?"),
    NamedCheck("source_reachable", (LIVE,), "can the source be connected to and its catalog read?"),
    NamedCheck("not_a_transaction_pooler", (LIVE,), "does the connection keep one server session?"),
    NamedCheck("source_version_compatible", (LIVE, UPLOAD), "can the project's PostgreSQL restore it?"),
    NamedCheck("source_size_within_plan", (LIVE, UPLOAD), "does it fit the project's storage limit?"),
    NamedCheck(
        "extensions_available_on_target", (LIVE, UPLOAD), "are its extensions allowed and installable?"
    ),
    NamedCheck(
        "target_database_empty", (LIVE, UPLOAD), "is the project's database empty, or to be replaced?"
    ),
    NamedCheck("no_event_triggers", (LIVE, UPLOAD), "does it hold event triggers (skipped)?"),
    NamedCheck("no_untrusted_languages", (LIVE, UPLOAD), "does it use untrusted languages (skipped)?"),
    NamedCheck("no_large_objects", (LIVE, UPLOAD), "does it hold large objects (slow)?"),
    NamedCheck("no_foreign_servers", (LIVE, UPLOAD), "does it hold foreign servers?"),
    NamedCheck("no_logical_replication", (LIVE, UPLOAD), "does it hold publications or subscriptions?"),
    NamedCheck("dump_read_in_full", (UPLOAD,), "did preflight read the whole upload?"),
    NamedCheck(
        "schema_rehearsal",
        (LIVE, UPLOAD),
        "does its schema restore, as the project's role, into a throw-away database?",
    ),
)


def names_for(sequence: str) -> tuple[str, ...]:
    """The names of `sequence`'s checks (LIVE or UPLOAD), in report order."""
    return tuple(check.name for check in REGISTRY if sequence in check.runs_for)


LIVE_CHECKS = names_for(LIVE)
UPLOAD_CHECKS = names_for(UPLOAD)
OBJECT_CHECKS = (
    "no_event_triggers",
    "no_untrusted_languages",
    "no_large_objects",
    "no_foreign_servers",
    "no_logical_replication",
)
SCHEMA_REHEARSAL = "schema_rehearsal"
