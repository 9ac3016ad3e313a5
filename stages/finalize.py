"""Finalize stage: prove the preview holds what the source held, then swap it in."""

from __future__ import annotations

from stages import inventory
from stages.cluster import ClusterAdmin
from stages.errors import PermanentError


class VerificationFailed(PermanentError):
    """The restored database does not match the source."""


def verify_preview(
    admin: ClusterAdmin, preview: str, source_counts: dict[str, int], present: list[str] = ()
) -> dict[str, int]:
    """Count every table of the preview and compare with the source's counts; the
    tables in `present` (whose source count is unknown) must merely exist.

    Raises VerificationFailed naming every missing table and every mismatch;
    returns the preview's counts otherwise.
    """
    with admin.connection(preview) as conn:
        target_counts = inventory.count_rows(conn)
    problems = inventory.compare_counts(source_counts, target_counts)
    problems += [f"table {table} is missing" for table in present if table not in target_counts]
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise VerificationFailed(
            f"the restored database does not match the source: {shown}{more}; "
            "the project's database was not changed"
        )
    return target_counts
