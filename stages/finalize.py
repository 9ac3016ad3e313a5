"""Finalize stage: prove the preview holds what the source held, and say so in a report.

A missing table, a row count or a sequence value that differs fails the import (the
project's database is not touched). Objects the managed target could not restore were
skipped earlier with a reason; they, and any other difference in object counts, make
warnings on a completed job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from stages.database import inventory
from stages.database.cluster import NO_STATEMENT_TIMEOUT, ClusterAdmin, RoleLogin
from stages.errors import PermanentError
from stages.preflight.extensions import ALWAYS_ALLOWED


class VerificationFailed(PermanentError):
    """The restored database does not match the source."""


class ExtensionNotAllowed(PermanentError):
    """The restored database holds an extension outside the allowlist."""


def verify_preview(
    admin: ClusterAdmin,
    preview: str,
    restorer: RoleLogin,
    source_counts: dict[str, int],
    present: Sequence[str] = (),
    source_sequences: dict[str, int | None] | None = None,
    *,
    allowlist: Iterable[str],
    copied: dict[str, int] | None = None,
    extension_rows: dict[str, int] | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Count every table of the preview and compare with the source's counts; the
    tables in `present` (whose source count is unknown) must merely exist; every
    sequence of the source must have its value; every extension installed must be on
    the allowlist. An extension's configuration table counts the rows beyond those its
    CREATE EXTENSION put there (`extension_rows`): the dump's, which the source counted
    as pg_dump selects them (whatever version of the extension made them).

    Reads the preview as `restorer`, the unprivileged role that restored it (it
    bypasses row-level security, so counts are exact), never as the admin.
    Raises ExtensionNotAllowed or VerificationFailed naming every problem; returns the
    preview's row counts and its description (object counts, sequences, extensions).

    `copied`: the rows the copy engine's COPY put in each table (its own `COPY n`, in
    the preview that only the restore role has touched since); those tables are not
    counted again.
    """
    with admin.role_connection(preview, restorer, "-c row_security=off", NO_STATEMENT_TIMEOUT) as conn:
        # A statement per transaction: counting a table locks it until the transaction
        # ends, and the preview's tables must not fill the cluster's shared lock table.
        # Nobody else is in the preview, so the counts are as consistent as in one.
        conn.autocommit = True
        copied = copied or {}
        tables = [
            (schema, name)
            for schema, name in inventory.list_tables(conn)
            if inventory.table_key(schema, name) not in copied
        ]
        target_counts = inventory.count_rows(conn, tables)
        existing = {inventory.table_key(schema, name) for schema, name in inventory.list_tables(conn)}
        target_counts.update({key: rows for key, rows in copied.items() if key in existing})
        # Counted by partition root in a dump made with --load-via-partition-root.
        target_counts.update(
            inventory.count_partition_trees(conn, sorted(set(source_counts) - set(target_counts)))
        )
        # An extension's configuration tables: the rows beyond the extension's own.
        configuration = [
            (relation.schema, relation.name)
            for relation in inventory.extension_configuration(conn)
            if relation.is_table and (relation.key in source_counts or relation.key in present)
        ]
        own_rows = extension_rows or {}
        configured = inventory.count_rows(conn, configuration)
        target_counts.update({key: rows - own_rows.get(key, 0) for key, rows in configured.items()})
        description = inventory.describe(conn)
        for_roles = inventory.policies_for_roles(conn)
        conn.rollback()
    check_extensions(description["extensions"], allowlist)
    if for_roles:
        # The schema rehearsal skips these; one that reached the preview anyway (past
        # the head of a plain dump the rehearsal read) must not be handed over.
        named = "; ".join(
            f"policy {policy} on {schema}.{table} for {roles}" for schema, table, policy, roles in for_roles
        )
        raise VerificationFailed(
            f"the dump creates policies for roles a project cannot have: {named}; make them for PUBLIC (or drop "
            "them) in the source, dump again, and recreate them for the project's roles after the import; "
            "the project's database was not changed"
        )
    problems = inventory.compare_counts(
        {key: rows for key, rows in source_counts.items() if key not in configured}, target_counts
    )
    problems += [
        f"table {key} has {rows} rows, not {own_rows.get(key, 0) + source_counts[key]}: "
        f"the {own_rows.get(key, 0)} its extension made and the source's {source_counts[key]}"
        for key, rows in sorted(configured.items())
        if key in source_counts and target_counts[key] != source_counts[key]
    ]
    problems += [f"table {table} is missing" for table in present if table not in target_counts]
    target_sequences = description["sequences"]
    for name, value in sorted((source_sequences or {}).items()):
        if name not in target_sequences:
            problems.append(f"sequence {name} is missing")
        elif target_sequences[name] != value:
            problems.append(f"sequence {name} is at {target_sequences[name]}, the source is at {value}")
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise VerificationFailed(
            f"the restored database does not match the source: {shown}{more}; "
            "the project's database was not changed"
        )
    return target_counts, description


def check_extensions(installed: Iterable[str], allowlist: Iterable[str]) -> None:
    """Fail naming every installed extension outside the allowlist.

    Extensions the dump names plainly are refused before the restore; this catches the
    ones it installs any other way (a statement built in a DO block or a function, a
    statement split over lines): what counts is what the preview holds.
    """
    allowed = set(allowlist) | ALWAYS_ALLOWED
    outside = sorted(set(installed) - allowed)
    if outside:
        raise ExtensionNotAllowed(
            f"the dump installed extensions this platform does not offer: {', '.join(outside)}; "
            "remove them from the dump (every CREATE EXTENSION, including ones built in DO blocks "
            f"or functions) and import again (allowed: {', '.join(sorted(allowed))}); "
            "the project's database was not changed"
        )


def build_report(
    *,
    source_counts: dict[str, int],
    target_counts: dict[str, int],
    source: dict[str, Any],
    target: dict[str, Any],
    source_basis: str,
    skipped: list[dict[str, str]],
    uncounted: list[str],
) -> dict[str, Any]:
    """The verification report of a completed job (see README, "The report")."""
    kinds = sorted(set(source.get("objects", {})) | set(target["objects"]))
    objects = {
        k: {"source": source.get("objects", {}).get(k), "target": target["objects"].get(k)} for k in kinds
    }
    warnings = [f"skipped {item['object']}: {item['reason']}" for item in skipped]
    # Counts from a dump's TOC or statements are not the catalog's (a partition's
    # constraints, for one, are listed apart), so only a live source's counts are
    # compared kind by kind; rows and sequences are verified either way.
    if source_basis == "source snapshot":
        for kind, pair in objects.items():
            if pair["source"] != pair["target"]:
                warnings.append(f"{kind}: {pair['source']} on the source, {pair['target']} restored")
    extensions = {
        name: {"source": source.get("extensions", {}).get(name), "target": target["extensions"].get(name)}
        for name in sorted(set(source.get("extensions", {})) | set(target["extensions"]))
    }
    sequences = {
        name: {"source": value, "target": target["sequences"].get(name)}
        for name, value in sorted(source.get("sequences", {}).items())
    }
    return {
        "tables": {
            name: {"source_rows": source_counts[name], "target_rows": target_counts.get(name)}
            for name in sorted(source_counts)
        },
        "table_count": len(source_counts) + len(uncounted),
        "row_count": sum(source_counts.values()),
        "uncounted_tables": uncounted,
        "sequences": sequences,
        "objects": objects,
        "objects_source": source_basis,
        "extensions": extensions,
        "skipped": skipped,
        "warnings": warnings,
    }
