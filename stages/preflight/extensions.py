"""Which extensions a source may bring: the allowlist, and what the target can install.

Pure logic over names and versions; the caller reads them from the source (or the
dump) and from the target cluster's `pg_available_extensions`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stages.errors import PermanentError

DEFAULT_EXTENSION_ALLOWLIST = (
    "pg_stat_statements",
    "pgcrypto",
    "uuid-ossp",
    "citext",
    "hstore",
    "pg_trgm",
    "vector",
    "postgis",
    "unaccent",
    "ltree",
    "fuzzystrmatch",
    "btree_gin",
    "btree_gist",
    "plpgsql",
)
# Every database has plpgsql (initdb creates it); refusing it would refuse everything.
ALWAYS_ALLOWED = frozenset({"plpgsql"})


@dataclass(frozen=True)
class Extension:
    name: str
    version: str | None = None

    def label(self) -> str:
        return f"{self.name} {self.version}" if self.version else self.name


@dataclass(frozen=True)
class ExtensionVerdict:
    """What is wrong with a source's extensions: names outside the allowlist, allowed
    ones the target cannot install, and ones the target has only in an older version.
    `available` is None when the target's extensions were not looked at."""

    extensions: tuple[Extension, ...]
    not_allowed: tuple[Extension, ...]
    not_installable: tuple[Extension, ...]
    older_on_target: tuple[tuple[Extension, str], ...]
    allowlist: tuple[str, ...]
    availability_checked: bool

    @property
    def failed(self) -> bool:
        return bool(self.not_allowed or self.not_installable)

    def detail(self, what: str) -> str:
        """The check's detail; `what` names the source ("the source database", "the dump")."""
        older = "; ".join(
            f"{ext.name} (source {ext.version}, project {target})" for ext, target in self.older_on_target
        )
        if self.failed:
            parts = []
            if self.not_allowed:
                allowed = ", ".join(sorted(set(self.allowlist) | ALWAYS_ALLOWED))
                parts.append(
                    f"{what} uses extensions CapyDB does not allow: {_labels(self.not_allowed)} "
                    f"(allowed: {allowed})"
                )
            if self.not_installable:
                parts.append(
                    f"{'it also uses' if parts else what + ' uses'} allowed extensions that the "
                    f"project's cluster cannot install: {_labels(self.not_installable)}"
                )
            if older:
                parts.append(f"the project's cluster has older versions of: {older}")
            return "; ".join(parts) + ". Drop them from the source (DROP EXTENSION) and import again"
        if older:
            return (
                f"the project's cluster has older versions of: {older}; the restore creates the "
                "project's version, so objects that need the newer one may fail to restore"
            )
        others = [ext for ext in self.extensions if ext.name not in ALWAYS_ALLOWED]
        if not others:
            return f"{what} uses no extensions besides plpgsql"
        if self.availability_checked:
            return f"{what} uses {_labels(others)}: all allowed and available on the project's cluster"
        return f"{what} uses {_labels(others)}: all allowed (the project's cluster was not asked)"


def judge_extensions(
    extensions: Iterable[Extension],
    allowlist: Iterable[str],
    available: Mapping[str, str] | None,
) -> ExtensionVerdict:
    """Compare a source's extensions with the allowlist and with the target's
    `pg_available_extensions` (name -> default_version), or None to skip that part."""
    found = tuple(sorted(extensions, key=lambda ext: ext.name))
    allowed = set(allowlist) | ALWAYS_ALLOWED
    not_allowed = tuple(ext for ext in found if ext.name not in allowed)
    not_installable: list[Extension] = []
    older: list[tuple[Extension, str]] = []
    if available is not None:
        for ext in found:
            if ext.name not in allowed or ext.name in ALWAYS_ALLOWED:
                continue
            if ext.name not in available:
                not_installable.append(ext)
            elif _is_older(available[ext.name], ext.version):
                older.append((ext, available[ext.name]))
    return ExtensionVerdict(
        extensions=found,
        not_allowed=not_allowed,
        not_installable=tuple(not_installable),
        older_on_target=tuple(older),
        allowlist=tuple(allowlist),
        availability_checked=available is not None,
    )


def require_allowlisted(extensions: Iterable[str], allowlist: Iterable[str]) -> None:
    """The gate at fetch, on what the whole dump creates (preflight may have read only
    its head): PermanentError naming every extension outside `allowlist`."""
    allowed = tuple(allowlist)
    outside = sorted(set(extensions) - set(allowed) - ALWAYS_ALLOWED)
    if outside:
        raise PermanentError(
            f"the source uses extensions this platform does not offer: {', '.join(outside)}; "
            f"drop them from the source (allowed: {', '.join(allowed)})"
        )


def _labels(extensions: Iterable[Extension]) -> str:
    return ", ".join(ext.label() for ext in extensions)


def _version_key(version: str) -> tuple[int, ...] | None:
    """(1, 8) for "1.8"; None for a version that is not dotted numbers ("1.0beta")."""
    if not re.fullmatch(r"\d+(\.\d+)*", version):
        return None
    return tuple(int(part) for part in version.split("."))


def _is_older(target: str | None, source: str | None) -> bool:
    if not target or not source:
        return False
    target_key, source_key = _version_key(target), _version_key(source)
    if target_key is None or source_key is None:
        return False
    return target_key < source_key
