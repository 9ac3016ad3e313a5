"""What the client prints: job progress, the report, preflight checks, job lists.

Pure functions build text and rich renderables from the API's JSON; the views in
`client.views` decide when to print them. Colours come from rich, which leaves them out
when the output is not a terminal (or NO_COLOR is set).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}
STATE_STYLE = {
    "completed": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "running": "cyan",
    "pending": "cyan",
}


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable: the loop returns at TiB


def duration(seconds: float | int | None) -> str:
    """`1h02m03s`, `2m05s`, `7s`."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def job_duration(job: dict[str, Any]) -> float | None:
    start, end = _time(job.get("started_at") or job.get("created_at")), _time(job.get("completed_at"))
    return (end - start).total_seconds() if start and end else None


def progress_line(job: dict[str, Any]) -> str:
    """One line on where a job is: `restore: copying data · tables 3/15 · 1.0 MiB of 4.0 MiB
    (25%) · 1,234 rows (617 rows/s) · ETA 12s`. Only the fields the stage reports appear."""
    progress = job.get("progress") or {}
    state = job.get("state", "?")
    where = job.get("stage") or progress.get("stage")
    head = state if state in ("pending", "completed", "failed", "cancelled") or not where else where
    phase = progress.get("phase")
    step = progress.get("step")
    parts = [f"{head}: {phase}" if phase and phase != head else head]
    if step and step not in (phase or ""):
        parts[0] += f" [{step}]"
    if progress.get("tables_total"):
        parts.append(
            f"tables {progress.get('tables_done', 0)}/{progress['tables_total']}"
            if "tables_done" in progress
            else f"{progress['tables_total']} tables"
        )
    if progress.get("bytes_total"):
        done, total = progress.get("bytes_done", 0) or 0, progress["bytes_total"]
        parts.append(f"{human_bytes(done)} of {human_bytes(total)} ({100 * done // total}%)")
    if "rows_done" in progress:
        rows = f"{progress['rows_done']:,} rows"
        if progress.get("rows_per_second"):
            rows += f" ({progress['rows_per_second']:,} rows/s)"
        parts.append(rows)
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {duration(progress['eta_seconds'])}")
    if job.get("cancel_requested_at") and state not in ("cancelled", "completed", "failed"):
        parts.append("cancelling")
    return " · ".join(parts)


def job_summary(job: dict[str, Any]) -> Text:
    """A job's outcome in a sentence or two (the error of a failed job, as the API words it)."""
    state = job.get("state", "?")
    text = Text()
    text.append(f"Import {job.get('id')} ")
    text.append(state, style=STATE_STYLE.get(state, ""))
    if state == "completed":
        report = job.get("report") or {}
        took = job_duration(job)
        text.append(f" in {duration(took)}" if took is not None else "")
        if report:
            text.append(f": {report.get('table_count', 0)} tables, {report.get('row_count', 0):,} rows")
            if report.get("replaced_database"):
                text.append(f"; the previous database is kept as {report['replaced_database']}")
        text.append(".")
    elif state == "failed":
        if job.get("retry_classification"):
            text.append(f" ({job['retry_classification']})")
        text.append(f": {job.get('error') or 'no reason given'}")
        if job.get("last_exit_code") not in (None, 0) and job.get("last_stderr"):
            tail = "\n".join(str(job["last_stderr"]).strip().splitlines()[-5:])
            text.append(f"\nlast command exited {job['last_exit_code']}:\n{tail}", style="dim")
    elif state == "cancelled":
        text.append(": the project's database was left as it was.")
    else:
        text.append(f": {progress_line(job)}")
    source = job.get("source") or {}
    origin = source.get("url") or source.get("upload_key")
    if origin:
        text.append(f"\nsource: {origin}", style="dim")
    return text


def _add_row(table: Table, *cells: str | Text) -> None:
    """Add a row whose strings are plain text: names and messages from the API may hold
    brackets, which rich would otherwise read as markup."""
    table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells))


def _rows(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else ("—" if value is None else str(value))


def _mark(source: Any, target: Any) -> Text:
    """`ok` or `differs`; nothing when the source's side is not known (a dump does not say)."""
    if source is None:
        return Text("")
    return Text("ok", style="green") if source == target else Text("differs", style="bold red")


def report_tables(report: dict[str, Any]) -> RenderableType:
    """The import report (README, "The report") as tables: rows per table, objects,
    sequences and extensions source against target, then what was skipped and warnings."""
    parts: list[RenderableType] = []
    tables = Table(title="Tables", title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("table", "left"),
        ("source rows", "right"),
        ("target rows", "right"),
        ("", "left"),
    )
    for column, justify in columns:
        tables.add_column(column, justify=justify)
    # Sorted here: the API's JSON objects come back in no particular key order.
    for name, counts in sorted((report.get("tables") or {}).items()):
        source, target = counts.get("source_rows"), counts.get("target_rows")
        _add_row(tables, name, _rows(source), _rows(target), _mark(source, target))
    for name in report.get("uncounted_tables") or []:
        _add_row(tables, name, "—", "—", Text("not counted", style="yellow"))
    tables.add_section()
    _add_row(tables, f"{report.get('table_count', 0)} tables", _rows(report.get("row_count")), "", "")
    parts.append(tables)
    for title, key in (("Objects", "objects"), ("Sequences", "sequences"), ("Extensions", "extensions")):
        pairs = report.get(key) or {}
        if not pairs:
            continue
        table = Table(
            title=title if key != "objects" else f"Objects (source: {report.get('objects_source', '?')})",
            title_justify="left",
        )
        table.add_column(key[:-1])
        table.add_column("source", justify="right")
        table.add_column("target", justify="right")
        table.add_column("")
        # Counts by kind from a dump's table of contents are not the catalog's: the API
        # compares them only for a live source (README, "The report"), and so does this.
        compared = key != "objects" or report.get("objects_source") == "source snapshot"
        for name, pair in sorted(pairs.items()):
            _add_row(
                table,
                name,
                _rows(pair.get("source")),
                _rows(pair.get("target")),
                _mark(pair.get("source"), pair.get("target")) if compared else "",
            )
        parts.append(table)
    skipped = report.get("skipped") or []
    if skipped:
        table = Table(title="Skipped", title_justify="left")
        table.add_column("object")
        table.add_column("reason")
        for item in skipped:
            _add_row(table, str(item.get("object", "?")), str(item.get("reason", "")))
        parts.append(table)
    for warning in report.get("warnings") or []:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    return Group(*parts)


def preflight_table(preflight: dict[str, Any]) -> RenderableType:
    """The checks with their status and detail, then what preflight learnt of the source."""
    table = Table(title="Preflight checks", title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for check in preflight.get("checks") or []:
        status = str(check.get("status", "?"))
        _add_row(
            table,
            str(check.get("name", "?")),
            Text(status, style=STATUS_STYLE.get(status, "")),
            str(check.get("detail", "")),
        )
    source = preflight.get("source") or {}
    facts = Text()
    if source.get("server_version"):
        facts.append(f"source: PostgreSQL {source['server_version']}")
    if source.get("database_size_bytes") is not None:
        facts.append(f", {human_bytes(source['database_size_bytes'])}")
    extensions = source.get("extensions") or []
    if extensions:
        facts.append(
            ", extensions " + ", ".join(f"{e.get('name')} {e.get('version', '')}".strip() for e in extensions)
        )
    if preflight.get("target_version"):
        facts.append(("\n" if facts else "") + f"target: PostgreSQL {preflight['target_version']}")
    if preflight.get("storage_limit_bytes") is not None:
        facts.append(f", storage limit {human_bytes(preflight['storage_limit_bytes'])}")
    verdict = (
        Text("Preflight passed: the import can go ahead.", style="green")
        if preflight.get("ok")
        else Text("Preflight failed: fix the failing checks before importing.", style="bold red")
    )
    return Group(table, facts, verdict) if facts else Group(table, verdict)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="Import jobs (newest first)", title_justify="left")
    for column in ("job", "state", "stage", "created", "source", "error / progress"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        state = str(job.get("state"))
        source = job.get("source") or {}
        note = (
            job.get("error")
            if state == "failed"
            else ("" if state in ("completed", "cancelled") else progress_line(job))
        )
        _add_row(
            table,
            str(job.get("id")),
            Text(state, style=STATE_STYLE.get(state, "")),
            str(job.get("stage") or ""),
            str(job.get("created_at") or ""),
            str(source.get("url") or source.get("upload_key") or ""),
            str(note or ""),
        )
    return table
