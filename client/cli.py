"""`capydb-import`: import a Postgres database into a CapyDB project over the HTTP API.

    capydb-import import --api URL --key KEY --project ID (--source-url URL | --file DUMP | --upload-key KEY)
                         [--recreate] [--wait] [--idempotency-key KEY]
    capydb-import preflight --project ID (--source-url URL | --file DUMP | --upload-key KEY) [--recreate]
    capydb-import upload --project ID --file DUMP
    capydb-import status JOB [--wait]
    capydb-import cancel JOB [--wait]
    capydb-import jobs --project ID [--limit N]

Every command takes --api, --key and --json; the API URL, key and project may come
from CAPYDB_API_URL, CAPYDB_API_KEY and CAPYDB_PROJECT_ID instead (so the key stays
out of shell history), and a live source from CAPYDB_SOURCE_URL. Exit codes: see
`client.errors.Exit`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, RenderableType

from client.api import Api, Session
from client.errors import ApiRefused, ClientError, Exit, UsageError
from client.follow import TERMINAL, follow
from client.render import job_summary, jobs_table, preflight_table, progress_line, report_tables
from client.upload import check_dump, post_dump
from client.views import UploadBar, job_view

OUTCOME = {"completed": Exit.OK, "failed": Exit.FAILED, "cancelled": Exit.CANCELLED}


class Interrupted(ClientError):
    """Ctrl-C: the client stopped; what it started goes on on the server."""

    exit_code = Exit.INTERRUPTED


@dataclass
class Io:
    """The command's collaborators: where it prints, how it waits and asks (tests pass fakes)."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    session: Session | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    ask: Callable[[str], str] = input
    interactive: bool = field(default_factory=lambda: sys.stdin.isatty())
    new_idempotency_key: Callable[[], str] = lambda: str(uuid.uuid4())
    out: Console = field(init=False)
    err: Console = field(init=False)

    def __post_init__(self) -> None:
        self.out = _console(self.stdout, self.env)
        self.err = _console(self.stderr, self.env)

    def notify(self, message: str) -> None:
        self.err.print(message, style="yellow", highlight=False, soft_wrap=True)

    def confirm(self, question: str) -> bool:
        try:
            return self.ask(question).strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False


def _console(file: TextIO, env: Mapping[str, str]) -> Console:
    # No markup: the API's messages and names may hold brackets, which are text here.
    console = Console(file=file, highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in env:
        # Rich's 80 columns folds table names in logs; logs have room.
        console = Console(file=file, highlight=False, markup=False, width=160)
    return console


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", metavar="URL", help="the API's base URL (default: $CAPYDB_API_URL)")
    common.add_argument(
        "--key",
        metavar="KEY",
        help="an API key, capy_live_… (default: $CAPYDB_API_KEY; prefer it, "
        "so the key stays out of shell history)",
    )
    common.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of tables"
    )

    def project(p: argparse.ArgumentParser) -> None:
        p.add_argument("--project", metavar="ID", help="the project, prj_… (default: $CAPYDB_PROJECT_ID)")

    def source(p: argparse.ArgumentParser, *, upload_key: bool = True) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument(
            "--source-url", metavar="URL", help="a live source, postgres://… (or $CAPYDB_SOURCE_URL)"
        )
        group.add_argument(
            "--file",
            metavar="DUMP",
            type=Path,
            help="a dump to upload (pg_dump -Fc, -Ft, or plain SQL, gzipped or not)",
        )
        if upload_key:
            group.add_argument(
                "--upload-key", metavar="KEY", help="a dump uploaded before (`capydb-import upload`)"
            )
        p.add_argument(
            "--recreate", action="store_true", help="import even if the project's database is not empty"
        )

    parser = argparse.ArgumentParser(
        prog="capydb-import",
        description="Import a Postgres database into a CapyDB project, over the CapyDB Imports API.",
        epilog="Exit codes: 0 success, 1 import or preflight failed, 2 bad usage, 3 cancelled, "
        "4 API unreachable or down, 5 API refused the request, 130 interrupted (the import goes on).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "import", parents=[common], help="start an import (it replaces the project's database)"
    )
    project(p)
    source(p)
    p.add_argument("--wait", action="store_true", help="follow the import until it ends and print its report")
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="sent as Idempotency-Key: the same key and request give back the same job, so a script "
        "may run the command again safely (default: a new UUID per run; retries within a run reuse it)",
    )
    p = commands.add_parser(
        "preflight", parents=[common], help="check a source or dump against the project; changes nothing"
    )
    project(p)
    source(p)
    p = commands.add_parser(
        "upload",
        parents=[common],
        help="upload a dump, for `import --upload-key` or `preflight --upload-key`",
    )
    project(p)
    p.add_argument("--file", metavar="DUMP", type=Path, required=True, help="the dump to upload")
    for name, text in (("status", "show a job (and its report once completed)"), ("cancel", "cancel a job")):
        p = commands.add_parser(name, parents=[common], help=text)
        p.add_argument("job", metavar="JOB", help="the job, job_…")
        p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p = commands.add_parser("jobs", parents=[common], help="list a project's import jobs, newest first")
    project(p)
    p.add_argument("--limit", type=int, default=25, help="how many (1 to 100, default 25)")
    return parser


def _required(value: str | None, env: Mapping[str, str], name: str, flag: str) -> str:
    value = value or env.get(name, "").strip()
    if not value:
        raise UsageError(f"{flag} is missing: pass {flag} or set {name}")
    return value


class Command:
    """One parsed command line, run against the API."""

    def __init__(self, args: argparse.Namespace, io: Io) -> None:
        self.args = args
        self.io = io
        self.api = Api(
            _required(args.api, io.env, "CAPYDB_API_URL", "--api"),
            _required(args.key, io.env, "CAPYDB_API_KEY", "--key"),
            session=io.session,
            sleep=io.sleep,
            notify=io.notify,
        )

    @property
    def project(self) -> str:
        return _required(self.args.project, self.io.env, "CAPYDB_PROJECT_ID", "--project")

    def emit(self, obj: dict[str, Any]) -> None:
        self.io.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        self.io.stdout.flush()

    def show(self, table: Callable[[Any], RenderableType], data: Any, *, soft_wrap: bool = False) -> None:
        """`data` laid out by `table`; as JSON if it is not in a shape the table knows
        (an API newer than this client, or not the API): never a traceback."""
        try:
            renderable = table(data)
        except (AttributeError, KeyError, TypeError, ValueError):
            self.say("(the API's answer is not in a shape this client can lay out; here it is as JSON)")
            self.io.out.print(json.dumps(data, indent=2, sort_keys=True), soft_wrap=True)
            return
        self.io.out.print(renderable, soft_wrap=soft_wrap)

    def say(self, message: str) -> None:
        """Progress and hints for a person: stderr, and not at all with --json."""
        if not self.args.json:
            self.io.err.print(message, highlight=False, soft_wrap=True)

    # Sources.

    def upload(self, path: Path) -> str:
        """Upload the dump through a presigned form; its object key."""
        size = check_dump(path)
        upload = self.api.create_upload(self.project)
        session = self.api.session
        with UploadBar(self.io.err, path.name, size, quiet=self.args.json, clock=self.io.clock) as bar:
            post_dump(session, upload, path, size, bar.advance)
        key: str = upload["object_key"]
        return key

    def source(self) -> dict[str, str]:
        args = self.args
        if args.file is not None:
            return {"upload_key": self.upload(args.file)}
        if getattr(args, "upload_key", None):
            return {"upload_key": args.upload_key}
        url = args.source_url or self.io.env.get("CAPYDB_SOURCE_URL", "").strip()
        if not url:
            raise UsageError("no source: pass --source-url URL or --file DUMP (or set CAPYDB_SOURCE_URL)")
        return {"source_url": url}

    # Following a job.

    def watch(self, job_id: str) -> dict[str, Any]:
        view = job_view(self.io.err, quiet=self.args.json)
        try:
            return follow(
                self.api, job_id, view, sleep=self.io.sleep, clock=self.io.clock, notify=self.io.notify
            )
        except KeyboardInterrupt:
            view.close()
            if not (
                self.io.interactive
                and not self.args.json
                and self.io.confirm(f"\nCancel import {job_id} on the server? [y/N] ")
            ):
                raise Interrupted(
                    f"stopped watching; import {job_id} goes on on the server: follow it with "
                    f"`capydb-import status {job_id} --wait`, stop it with `capydb-import cancel {job_id}`"
                ) from None
        finally:
            view.close()
        try:
            self.api.cancel(job_id)
        except ApiRefused as err:
            if err.status != 409:
                raise
            # It ended while the question was asked: how it ended is the answer.
            self.say(f"not cancelled: {err.message}")
            return self.api.job(job_id)
        self.say("cancel requested; waiting for the import to stop (Ctrl-C again stops only the watching)")
        view = job_view(self.io.err, quiet=self.args.json)
        try:
            return follow(
                self.api, job_id, view, sleep=self.io.sleep, clock=self.io.clock, notify=self.io.notify
            )
        except KeyboardInterrupt:
            raise Interrupted(f"stopped watching; the cancel of {job_id} goes on on the server") from None
        finally:
            view.close()

    def finish(self, job: dict[str, Any]) -> Exit:
        """Print how the job ended (and its report); the exit code of its state."""
        if self.args.json:
            self.emit({"job": job})
        else:
            self.show(job_summary, job, soft_wrap=True)
            if job.get("state") == "completed" and job.get("report"):
                self.show(report_tables, job["report"])
        return OUTCOME.get(job.get("state", ""), Exit.OK)

    # The commands.

    def run_import(self) -> Exit:
        body = {"confirm": True, "recreate": self.args.recreate, **self.source()}
        job, created = self.api.start_import(
            self.project, body, self.args.idempotency_key or self.io.new_idempotency_key()
        )
        self.say(f"{'started' if created else 'already started:'} import {job['id']}")
        if not self.args.wait:
            if self.args.json:
                self.emit({"job": job})
            else:
                self.io.out.print(
                    f"Import {job['id']} is {job['state']}. Follow it with: capydb-import status {job['id']} --wait",
                    highlight=False,
                    soft_wrap=True,
                )
            return Exit.OK
        return self.finish(self.watch(job["id"]))

    def run_preflight(self) -> Exit:
        source = self.source()
        self.say("running preflight (it reads the source and changes nothing)")
        preflight = self.api.preflight(self.project, {"recreate": self.args.recreate, **source})
        if self.args.json:
            self.emit(
                {"preflight": preflight, **({"upload_key": source["upload_key"]} if self.args.file else {})}
            )
        else:
            self.show(preflight_table, preflight)
            if self.args.file is not None:
                self.io.out.print(
                    f"The dump is uploaded as {source['upload_key']}; import it without uploading again: "
                    f"capydb-import import --project {self.project} --upload-key {source['upload_key']}",
                    soft_wrap=True,
                )
        return Exit.OK if preflight.get("ok") else Exit.FAILED

    def run_upload(self) -> Exit:
        key = self.upload(self.args.file)
        if self.args.json:
            self.emit({"upload_key": key})
        else:
            self.io.out.print(key, soft_wrap=True)
        return Exit.OK

    def run_status(self) -> Exit:
        job = self.api.job(self.args.job)
        if self.args.wait and job.get("state") not in TERMINAL:
            job = self.watch(job["id"])
        return self.finish(job)

    def run_cancel(self) -> Exit:
        job = self.api.cancel(self.args.job)
        if job.get("state") != "cancelled":
            self.say(f"cancel requested: {progress_line(job)}")
            if self.args.wait:
                job = self.watch(job["id"])
        self.finish(job)
        if self.args.wait and job.get("state") != "cancelled":
            return Exit.FAILED  # it ended before the cancel took effect
        return Exit.OK

    def run_jobs(self) -> Exit:
        if not 1 <= self.args.limit <= 100:
            raise UsageError("--limit must be from 1 to 100")
        jobs = self.api.jobs(self.project, self.args.limit)
        if self.args.json:
            self.emit({"jobs": jobs})
        else:
            self.show(jobs_table, jobs)
        return Exit.OK


def run(argv: list[str], io: Io) -> int:
    """Run one command line; its exit code. Errors print as one line (JSON with --json)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse printed the usage error (or --help)
        return int(exit.code or 0)
    try:
        command = Command(args, io)
        return int(getattr(command, f"run_{args.command}")())
    except ClientError as err:
        if args.json:
            io.stdout.write(json.dumps({"error": err.message, "exit_code": int(err.exit_code)}) + "\n")
        else:
            io.err.print(f"capydb-import: error: {err.message}", style="red", highlight=False, soft_wrap=True)
        return int(err.exit_code)
    except KeyboardInterrupt:
        io.err.print("capydb-import: interrupted", highlight=False)
        return int(Exit.INTERRUPTED)


def main() -> None:
    sys.exit(run(sys.argv[1:], Io()))
