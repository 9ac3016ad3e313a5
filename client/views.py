"""Showing work as it happens: the upload's progress bar and the job's live progress.

On a terminal these are rich progress bars redrawn in place; elsewhere (a CI log, a
pipe) they print a line when something changes, so logs stay readable. Either way they
write to stderr: stdout holds only the results (tables, or JSON with --json).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from client.render import duration, human_bytes, progress_line

# Without a terminal, a job's unchanged phase is reported again at most this often.
LINE_EVERY_SECONDS = 15.0


class JobView(Protocol):
    def update(self, job: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class QuietView:
    """--json: nothing while the job runs."""

    def update(self, job: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class LineView:
    """A line per change of state, stage, step or phase, and every LINE_EVERY_SECONDS."""

    def __init__(self, console: Console, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.clock = clock
        self._last: tuple[Any, ...] | None = None
        self._at = 0.0

    def update(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        key = (job.get("state"), job.get("stage"), progress.get("step"), progress.get("phase"))
        now = self.clock()
        if key != self._last or now - self._at >= LINE_EVERY_SECONDS:
            self.console.print(progress_line(job), markup=False, highlight=False, soft_wrap=True)
            self._last, self._at = key, now

    def close(self) -> None:
        pass


class LiveView:
    """A bar of the bytes copied (when the stage knows its total) under the progress line."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[line]}", markup=False),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None

    def update(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        total, done = progress.get("bytes_total"), progress.get("bytes_done")
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("job", total=None, line="")
        self.progress.update(
            self.task, line=progress_line(job), total=total or None, completed=done if total else 0
        )

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def job_view(console: Console, *, quiet: bool) -> JobView:
    if quiet:
        return QuietView()
    return LiveView(console) if console.is_terminal else LineView(console)


class UploadBar:
    """The dump's upload: a bar with speed and time left on a terminal, two lines elsewhere."""

    def __init__(
        self,
        console: Console,
        name: str,
        size: int,
        *,
        quiet: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.name = name
        self.size = size
        self.quiet = quiet
        self.clock = clock
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.started = 0.0

    def __enter__(self) -> UploadBar:
        self.started = self.clock()
        if self.quiet:
            return self
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("uploading {task.description}", markup=False),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=self.size)
        else:
            self.console.print(
                f"uploading {self.name} ({human_bytes(self.size)})", markup=False, highlight=False
            )
        return self

    def advance(self, sent: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=sent)

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        if kind is None and not self.quiet:
            self.console.print(
                f"uploaded {self.name} in {duration(self.clock() - self.started)}",
                markup=False,
                highlight=False,
            )
