"""The vocabulary of preflight: a `Check`, the `Preflight` report, the `Target`, and the
`Findings` a source's catalog or a dump's contents yield.

A check that could not run because an earlier one failed (the source unreachable, the
upload not a dump) is still listed, as `warn` with a detail starting "not checked:",
so the list has the same names in the same order every time and `ok` is decided by
the checks that did run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.connections.pgurl import SourceURL
from stages.errors import CapyError, PermanentError, TransientError
from stages.preflight.extensions import DEFAULT_EXTENSION_ALLOWLIST

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
    # What the schema rehearsal leaves out: {"object", "reason", "key"} (see stages.dumps.toc.plan).
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False iff some check failed."""
        return all(check.status != FAIL for check in self.checks)

    def add(
        self,
        name: str,
        status: str,
        detail: str,
        *,
        transient: bool = False,
        when_repeated: str | None = None,
    ) -> None:
        self.checks.append(Check(name, status, detail, transient, when_repeated))

    def add_error(self, name: str, err: CapyError) -> None:
        """A failed check whose detail is `err`: transient (with what it means when it
        repeats) if the error is."""
        repeated = err.when_repeated if isinstance(err, TransientError) else None
        self.add(name, FAIL, err.message, transient=isinstance(err, TransientError), when_repeated=repeated)

    def not_checked(self, name: str, why: str) -> None:
        self.add(name, WARN, f"not checked: {why}")

    def in_order(self, names: tuple[str, ...]) -> None:
        """Put the checks in the registry's order (`names`, e.g. LIVE_CHECKS)."""
        rank = {name: index for index, name in enumerate(names)}
        self.checks.sort(key=lambda check: rank.get(check.name, len(rank)))

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
