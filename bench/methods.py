"""The baselines: what a user could type to copy a database, each timed the same way.

A method copies one source into a target database of its own and returns how long the
copy took (`Timed`). Only the copy is timed: making the empty target before, and the
verification and cleanup after, are not. Methods are small classes with `name`, `label`,
`mode` ("live": from the source database; "upload": from a local `-Fc` file of it) and
`run(trial)`; the service's two methods live in bench/service.py.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.pg import Cluster, CommandFailed, run

LIVE, UPLOAD = "live", "upload"


@dataclass
class Trial:
    """One round of one method on one dataset."""

    cluster: Cluster
    source: str  # the source database
    dump_file: Path | None  # the source as a `pg_dump -Fc` file (upload methods)
    scratch: Path  # a directory of this trial's own, removed after it
    target: str  # the name the baselines give their fresh, empty target database
    round: int


@dataclass
class Timed:
    """A finished copy: how long it took, where the copy is, and what was measured on the way."""

    seconds: float
    target: str  # the database to verify
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. peak RSS, peak disk
    cleanup: Callable[[], None] = lambda: None  # drops what the copy made, after verification


class Method(Protocol):
    name: str
    label: str
    mode: str

    def run(self, trial: Trial) -> Timed: ...


def _fresh_target(trial: Trial) -> Callable[[], None]:
    trial.cluster.drop(trial.target)
    trial.cluster.create(trial.target)
    return lambda: trial.cluster.drop(trial.target)


def _pipe(producer: list[str], consumer: list[str], scratch: Path) -> None:
    """`producer | consumer`, both checked: a failure of either raises CommandFailed."""
    with open(scratch / "producer.err", "wb") as perr, open(scratch / "consumer.err", "wb") as cerr:
        first = subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=perr)
        assert first.stdout is not None
        second = subprocess.Popen(consumer, stdin=first.stdout, stdout=subprocess.DEVNULL, stderr=cerr)
        first.stdout.close()  # the consumer holds the only read end: it sees EOF, we see SIGPIPE
        second.wait()
        first.wait()
    for argv, process, err in ((producer, first, "producer.err"), (consumer, second, "consumer.err")):
        if process.returncode != 0:
            raise CommandFailed(argv, process.returncode, (scratch / err).read_text(errors="replace")[-4000:])


class DumpPipeRestore:
    """`pg_dump -Fc | pg_restore` into a fresh empty database: the naive way."""

    name, label, mode = "dump-pipe", "pg_dump -Fc | pg_restore", LIVE

    def run(self, trial: Trial) -> Timed:
        cleanup = _fresh_target(trial)
        started = time.monotonic()
        _pipe(
            ["pg_dump", "-Fc", "-d", trial.cluster.url(trial.source)],
            ["pg_restore", "--exit-on-error", "-d", trial.cluster.url(trial.target)],
            trial.scratch,
        )
        return Timed(time.monotonic() - started, trial.target, cleanup=cleanup)


class DirectoryJobs:
    """`pg_dump -Fd -j2` to local disk, then `pg_restore -j2`: the parallel way by hand."""

    name, label, mode = "dump-dir-j2", "pg_dump -Fd -j2 + pg_restore -j2", LIVE

    def run(self, trial: Trial) -> Timed:
        cleanup = _fresh_target(trial)
        folder = trial.scratch / "dump"
        started = time.monotonic()
        run(["pg_dump", "-Fd", "-j2", "-f", str(folder), "-d", trial.cluster.url(trial.source)])
        run(["pg_restore", "-j2", "--exit-on-error", "-d", trial.cluster.url(trial.target), str(folder)])
        seconds = time.monotonic() - started
        shutil.rmtree(folder, ignore_errors=True)
        return Timed(seconds, trial.target, cleanup=cleanup)


class Pgcopydb:
    """`pgcopydb clone --table-jobs 2 --index-jobs 2` (Debian package pgcopydb)."""

    name, label, mode = "pgcopydb", "pgcopydb clone --table-jobs 2 --index-jobs 2", LIVE

    def run(self, trial: Trial) -> Timed:
        if shutil.which("pgcopydb") is None:
            raise CommandFailed(
                ["pgcopydb"], 127, "pgcopydb is not installed: apt-get install pgcopydb (as root)"
            )
        cleanup = _fresh_target(trial)
        started = time.monotonic()
        run(
            [
                "pgcopydb", "clone",
                "--source", trial.cluster.url(trial.source),
                "--target", trial.cluster.url(trial.target),
                "--table-jobs", "2", "--index-jobs", "2",
                "--dir", str(trial.scratch / "pgcopydb"),
            ]
        )  # fmt: skip
        return Timed(time.monotonic() - started, trial.target, cleanup=cleanup)


class RestoreFileJobs:
    """`pg_restore -j2` of a local `-Fc` file: the baseline of an uploaded dump."""

    name, label, mode = "restore-j2", "pg_restore -j2 of a local -Fc file", UPLOAD

    def run(self, trial: Trial) -> Timed:
        assert trial.dump_file is not None, "upload methods need the source's -Fc file"
        cleanup = _fresh_target(trial)
        started = time.monotonic()
        run(
            [
                "pg_restore",
                "-j2",
                "--exit-on-error",
                "-d",
                trial.cluster.url(trial.target),
                str(trial.dump_file),
            ]
        )
        return Timed(time.monotonic() - started, trial.target, cleanup=cleanup)


BASELINES: tuple[Method, ...] = (DumpPipeRestore(), DirectoryJobs(), Pgcopydb(), RestoreFileJobs())
