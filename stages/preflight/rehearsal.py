"""The schema rehearsal: restore a dump's schema, without data, into a throw-away
database as a role with the project role's privileges, and judge every error.

pg_restore with `--exit-on-error` stops at the first object it cannot create, after
the whole dump was fetched; without it, it goes on but says little about what
depended on what failed. So the rehearsal renders the schema part of the archive
(`pg_restore --schema-only --verbose --file=-`: each entry's SQL under its
"-- TOC entry N" header) and runs it entry by entry in the throw-away database, every
entry in a transaction of its own, collecting every error with the entry it belongs to.
The archive's dependency data (`pg_restore --list --verbose`: "depends on" lines) then
names everything that depends on a failed entry. Plain keys and btree indexes are not
run, nor plain tables beyond the first of each schema: they restore if their schema
and tables do (stages.preflight.implied).

The verdict on each failed entry and its dependents:

- an object a managed target cannot hold (it needs superuser, a role the project
  cannot have, a library the cluster lacks, ownership of a built-in type) that no
  table's data depends on is **skipped** with its reason: `Rehearsal.skipped` is the
  data the restore plan takes (stages.dumps.toc.plan's `skip`), keyed by (desc, namespace,
  name) so that it matches the entries of a later, full dump of the same source;
- anything a table's data depends on (a column type, a CHECK or default function, a
  constraint, an index) or an error of any other kind is **refused**, all listed.

A CHECK constraint that calls a function whose body names another table is refused
too: pg_dump restores a table's rows with its CHECK constraints
already in place, table after table, with `search_path` empty, so such a check fails
(or passes wrongly) when the table it reads is not loaded yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions

from stages.connections.pgurl import SourceURL
from stages.database import inventory
from stages.dumps import toc
from stages.dumps.sqlscript import SPACE, ScriptError, read_script
from stages.errors import CommandFailed, CommandTimedOut, TransientError
from stages.preflight.implied import implied_entries
from stages.preflight.registry import SCHEMA_REHEARSAL
from stages.preflight.report import FAIL, PASS, WARN, Preflight
from stages.preflight.sandbox import Sandbox, Scratch
from stages.tools.commands import PgTools
from stages.tools.timelimit import Deadline

# Errors that mean "a managed target cannot hold this as the project's role".
_MANAGED = re.compile(
    r"must be superuser|permission denied to create|permission denied for language|only superuser"
    r"|must be owner of (?:type|function|language|operator|procedural language|extension)"
    r"|permission denied for foreign-data wrapper|could not access file|must be member of role"
    r"|must be able to SET ROLE|permission denied to change owner|role \"[^\"]+\" does not exist"
    r"|language \"[^\"]+\" does not exist|permission denied for (?:type|schema pg_catalog)",
    re.I,
)
# Entries whose absence would change what a table holds or accepts: their failure
# refuses the import instead of skipping them.
DATA_KINDS = frozenset(
    {
        "TABLE",
        "DEFAULT",
        "CONSTRAINT",
        "CHECK CONSTRAINT",
        "FK CONSTRAINT",
        "INDEX",
        "INDEX ATTACH",
        "TABLE ATTACH",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "MATERIALIZED VIEW",
    }
)
_HEADER = re.compile(r"^--\n-- TOC entry (\d+) \(class \d+ OID \d+\)\n", re.M)
_PG_DUMP_RESTRICT = re.compile(r"^\\(?:un)?restrict [A-Za-z0-9]+$", re.M)
_DEPENDS = re.compile(r"^;\s*depends on:((?: \d+)+)\s*$")

Key = tuple[str, str, str]
# The id under which an error of the statements before the first entry is kept.
PREAMBLE = 0


@dataclass(frozen=True)
class Node:
    entry: toc.TocEntry
    depends_on: tuple[int, ...]

    @property
    def key(self) -> Key:
        return (self.entry.desc, self.entry.namespace, self.entry.name)

    @property
    def dump_id(self) -> int:
        return self.entry.dump_id

    @property
    def desc(self) -> str:
        return self.entry.desc

    @property
    def namespace(self) -> str:
        return self.entry.namespace

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Rehearsal:
    """What the rehearsal found. `skipped`: {"object", "reason", "key"} per entry left
    out; `refused`: one line per problem a table depends on (or of an unknown kind);
    `timed_out`: the limit it ran out of, when it did not finish; `unavailable`: why
    the schema could not be read at all (then nothing was rehearsed)."""

    rehearsed: int = 0
    implied: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    timed_out: str | None = None
    unavailable: str | None = None

    def skip_map(self) -> dict[Key, str]:
        return skip_map(self.skipped)


def skip_map(skipped: list[dict[str, Any]]) -> dict[Key, str]:
    """(desc, namespace, name) -> reason, from `Rehearsal.skipped` (as stored on a job)."""
    return {tuple(item["key"]): item["reason"] for item in skipped if item.get("key")}


def read_graph(tools: PgTools, archive: str) -> list[Node]:
    """The archive's entries with the ids each depends on (`pg_restore -l -v`)."""
    chunks: list[bytes] = []
    tools.pg_restore.run_streaming(
        ["--list", "--verbose", archive],
        lambda out: chunks.append(out.read()),
        what="reading the dump's dependencies",
    )
    nodes: list[Node] = []
    pending: toc.TocEntry | None = None
    deps: list[int] = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        parsed = toc.parse(line)
        if parsed:
            if pending is not None:
                nodes.append(Node(pending, tuple(deps)))
            pending, deps = parsed[0], []
            continue
        match = _DEPENDS.match(line)
        if match and pending is not None:
            deps.extend(int(part) for part in match.group(1).split())
    if pending is not None:
        nodes.append(Node(pending, tuple(deps)))
    return nodes


def render_schema(tools: PgTools, archive: str, wanted: list[toc.TocEntry], work_dir: str) -> str:
    """The SQL of `wanted`'s schema entries as the import's restore runs them (no owners,
    no grants), each under its "-- TOC entry N" header."""
    list_path = os.path.join(work_dir, "rehearsal.list")
    with open(list_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(entry.line for entry in wanted) + "\n")
    chunks: list[bytes] = []
    tools.pg_restore.run_streaming(
        [
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-tablespaces",
            "--verbose",
            f"--use-list={list_path}",
            "--file=-",
            archive,
        ],
        lambda out: chunks.append(out.read()),
        what="reading the dump's schema",
    )
    return b"".join(chunks).decode("utf-8", "replace")


def split_at_headers(
    script: str, header: re.Pattern[str], *, atomic_bodies: bool = False
) -> tuple[str, list[tuple[re.Match[str], str]]]:
    """(preamble, [(header, the SQL after it)]) of a pg_dump script cut at the header
    comments pg_dump writes before each entry: only comments between statements count,
    never text inside a string or a body that looks like one (stages.dumps.sqlscript).

    The scanner hands the script on in pieces of any size: a header may straddle two
    pieces of one run of space, and a character two pieces of one statement. So the
    pieces are joined first (a run of space, then the bytes of an entry) and decoded
    whole. `atomic_bodies`: see stages.dumps.sqlscript.read_script."""
    preamble: str | None = None
    blocks: list[tuple[re.Match[str], str]] = []
    current: re.Match[str] | None = None
    pending: list[bytes] = []  # the current entry's bytes, read so far
    space: list[bytes] = []  # the run of space between two statements, read so far

    def flush() -> None:
        nonlocal preamble
        text = b"".join(pending).decode("utf-8", "replace")
        pending.clear()
        if current is None:
            preamble = text
        else:
            blocks.append((current, text))

    def cut() -> None:
        """Cut the run of space read so far at the headers in it."""
        nonlocal current
        text = b"".join(space).decode("utf-8", "replace")
        space.clear()
        at = 0
        for found in header.finditer(text):
            pending.append(text[at : found.start()].encode("utf-8"))
            flush()
            current, at = found, found.end()
        pending.append(text[at:].encode("utf-8"))

    try:
        pieces = list(read_script([script.encode("utf-8")], atomic_bodies=atomic_bodies))
    except ScriptError:
        pieces = []
    if not pieces:
        return script, []
    for piece in pieces:
        if piece.kind == SPACE:
            space.append(piece.data)
            continue
        cut()
        pending.append(piece.data)
    cut()
    flush()
    return preamble or "", blocks


def split_script(script: str) -> tuple[str, dict[int, str]]:
    """(preamble, entry id -> SQL) of a `render_schema` script; pg_dump's `\\restrict`
    lines (psql commands) are left out."""
    script = _PG_DUMP_RESTRICT.sub("", script)
    preamble, parts = split_at_headers(script, _HEADER, atomic_bodies=True)
    return preamble, {int(found.group(1)): body for found, body in parts}


def rehearse_archive(
    tools: PgTools,
    archive: str,
    sandbox: Sandbox,
    work_dir: str,
    deadline: Deadline,
    *,
    allowed_extensions: set[str],
) -> Rehearsal:
    """Rehearse the schema of a custom or tar archive (`archive` may be just its head,
    when that holds the whole table of contents). Tools and statements stop at
    `deadline`: the result then says `timed_out`."""
    tools = _bounded(tools, deadline)
    try:
        nodes = read_graph(tools, archive)
        entries = [node.entry for node in nodes]
        extensions = {
            name: schema
            for name, schema in toc.extension_schemas(tools, archive, entries, work_dir).items()
            if name in allowed_extensions
        }
        plan = toc.plan(entries, precreated_schemas=set(extensions.values()) - {"public"})
        # What the plan leaves out already (event triggers, foreign data wrappers…): what
        # depends on those is judged as depending on a skipped object.
        kept = {entry.dump_id for entry in plan.keep}
        left_out = {
            node.entry.dump_id: reason
            for node in nodes
            if node.entry.dump_id not in kept and (reason := _left_out_reason(plan, node.entry)) is not None
        }
        preamble, blocks = split_script(render_schema(tools, archive, plan.keep, work_dir))
    except CommandTimedOut:
        return Rehearsal(timed_out=deadline.limit.describe())
    except CommandFailed as err:
        return Rehearsal(unavailable=f"pg_restore could not read the dump's schema ({err.message})")
    # Plain tables, keys and indexes are not run: they succeed or fail with their schema
    # and tables (stages.preflight.implied).
    implied = implied_entries(nodes, blocks)
    run = {dump_id: text for dump_id, text in blocks.items() if dump_id not in implied}
    result = rehearse_blocks(sandbox, extensions, preamble, run, deadline, lambda errors: nodes, left_out)
    result.implied = len(implied)
    return result


def rehearse_blocks(
    sandbox: Sandbox,
    extensions: Mapping[str, str],
    preamble: str,
    blocks: Mapping[int, str],
    deadline: Deadline,
    nodes_for: Callable[[Mapping[int, str]], list[Node]],
    left_out: Mapping[int, str] | None = None,
) -> Rehearsal:
    """Run the entries' SQL in a throw-away database with `extensions`, then judge the
    errors (`nodes_for(errors)`: the entries and what each depends on), and look for
    CHECKs that read other tables and policies for roles a project cannot have."""
    with sandbox.database(extensions) as scratch:
        errors, timed_out = run_entries(scratch, preamble, blocks, deadline)
        checks = [] if timed_out else risky_checks(scratch, deadline)
        foreign = [] if timed_out else foreign_role_policies(scratch, deadline)
    result = judge(nodes_for(errors), errors, left_out)
    result.rehearsed = len(blocks)
    result.skipped.extend(foreign)
    result.refused.extend(checks)
    if timed_out:
        result.timed_out = deadline.limit.describe()
    return result


# The live source's schema archive, in the rehearsal's folder.
SCHEMA_ARCHIVE = "schema.dump"


def rehearse_live(
    tools: PgTools,
    source: SourceURL,
    sandbox: Sandbox,
    work_dir: str,
    deadline: Deadline,
    *,
    allowed_extensions: set[str],
    timeout: int = 10,
    lock_wait_ms: int = 10_000,
) -> Rehearsal:
    """Dump the (address-pinned) source's schema (`dump_live_schema`) and rehearse it."""
    path = os.path.join(work_dir, SCHEMA_ARCHIVE)
    failed = dump_live_schema(tools, source, path, deadline, timeout=timeout, lock_wait_ms=lock_wait_ms)
    if failed is not None:
        return failed
    return rehearse_archive(tools, path, sandbox, work_dir, deadline, allowed_extensions=allowed_extensions)


def dump_live_schema(
    tools: PgTools,
    source: SourceURL,
    path: str,
    deadline: Deadline,
    *,
    timeout: int = 10,
    lock_wait_ms: int = 10_000,
) -> Rehearsal | None:
    """Dump the (address-pinned) source's schema to a custom archive at `path` (`pg_dump
    --schema-only`, read-only, bounded by `deadline`); None once it is there, else the
    rehearsal's result that says why it is not."""
    try:
        _bounded(tools, deadline).pg_dump.run(
            [
                "--schema-only",
                "--format=custom",
                f"--file={path}",
                "--no-password",
                f"--lock-wait-timeout={lock_wait_ms}",
                f"--dbname={source.conninfo(connect_timeout=str(timeout))}",
            ],
            # Money constants printed as the import's own schema dump prints them (stages.copy.live).
            env={**source.env(), "PGOPTIONS": "-c default_transaction_read_only=on -c lc_monetary=C"},
            secrets=[source.password],
            what="pg_dump --schema-only of the source",
        )
    except CommandTimedOut:
        return Rehearsal(timed_out=deadline.limit.describe())
    except CommandFailed as err:
        # The source's own problem (a table its user may not read…): the import's
        # dump meets it too and says what to do; it is not the target's to judge.
        return Rehearsal(unavailable=f"pg_dump could not dump the source's schema ({err.message})")
    return None


def _bounded(tools: PgTools, deadline: Deadline) -> PgTools:
    earliest = deadline if tools.deadline is None else Deadline.earliest(tools.deadline, deadline)
    return dataclasses.replace(tools, deadline=earliest)


@contextlib.contextmanager
def _cancel_at(conn: psycopg2.extensions.connection, deadline: Deadline) -> Iterator[threading.Event]:
    """Cancel the running statement when `deadline` passes (whatever the dump SET);
    the event tells that it did."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        with contextlib.suppress(psycopg2.Error):
            conn.cancel()

    timer = threading.Timer(max(0.0, deadline.remaining()), fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def run_entries(
    scratch: Scratch, preamble: str, blocks: Mapping[int, str], deadline: Deadline
) -> tuple[dict[int, str], bool]:
    """Run the preamble, then each entry as if in a transaction of its own, as the
    scratch database's role; entry id -> the server's error for each that failed, and
    whether the deadline stopped it.

    Entries run BATCH_ENTRIES to a transaction: a commit per entry made a schema of
    thousands of tables take several times longer to rehearse than to restore. When
    one fails, its batch is rolled back and run again up to it, the failing entry
    alone (its error is recorded), then the rest: the errors are those each entry
    meets on its own."""
    errors: dict[int, str] = {}
    with scratch.admin.role_connection(scratch.database, scratch.login, readonly=False) as conn:
        conn.autocommit = True
        with _cancel_at(conn, deadline) as fired, conn.cursor() as cur:
            # The scratch database is thrown away: nothing to wait for at each commit.
            cur.execute("SET synchronous_commit = off")
            if _has_sql(preamble):
                try:
                    cur.execute(preamble)
                except psycopg2.OperationalError as err:
                    raise TransientError(
                        "lost the session to the project cluster during the schema rehearsal"
                    ) from err
                except psycopg2.Error as err:
                    errors[PREAMBLE] = _message(err)
            # Entries with only comments ("*not* creating schema, since initdb creates it") run nothing.
            pending = [(dump_id, text) for dump_id, text in blocks.items() if _has_sql(text)]
            try:
                timed_out = _run_batched(cur, pending, errors, fired, deadline)
            except psycopg2.OperationalError as err:
                raise TransientError(
                    "lost the session to the project cluster during the schema rehearsal"
                ) from err
    return errors, timed_out


BATCH_ENTRIES = 200


class _TimedOut(Exception):
    """The rehearsal's deadline passed."""


def _run_batched(
    cur: psycopg2.extensions.cursor,
    pending: list[tuple[int, str]],
    errors: dict[int, str],
    fired: threading.Event,
    deadline: Deadline,
) -> bool:
    """Run `pending` (see run_entries); True if the deadline stopped it."""
    queue = [pending[i : i + BATCH_ENTRIES] for i in range(0, len(pending), BATCH_ENTRIES)]
    try:
        while queue:
            batch = queue.pop(0)
            if fired.is_set() or deadline.remaining() <= 0:
                raise _TimedOut
            if len(batch) == 1:
                _run_alone(cur, batch[0], errors, fired)
                continue
            failed_at = _run_together(cur, batch, fired)
            if failed_at is not None:
                # Again without the batch's later entries: the failing one alone, then the rest.
                queue[:0] = [
                    part for part in (batch[:failed_at], [batch[failed_at]], batch[failed_at + 1 :]) if part
                ]
    except _TimedOut:
        return True
    return False


def _run_together(
    cur: psycopg2.extensions.cursor, batch: list[tuple[int, str]], fired: threading.Event
) -> int | None:
    """Run `batch` in one transaction; the index of the entry that failed (the
    transaction then rolled back), or None once it committed."""
    cur.execute("BEGIN")
    for index, (_dump_id, text) in enumerate(batch):
        try:
            cur.execute(text)
        except psycopg2.errors.QueryCanceled:
            cur.execute("ROLLBACK")
            if fired.is_set():
                raise _TimedOut from None
            return index
        except psycopg2.OperationalError:
            raise
        except psycopg2.Error:
            cur.execute("ROLLBACK")
            return index
    # An entry may have ended the transaction itself (a COMMIT in its SQL): then this
    # only warns, and what followed it ran as separate transactions, as entries do.
    cur.execute("COMMIT")
    return None


def _run_alone(
    cur: psycopg2.extensions.cursor, entry: tuple[int, str], errors: dict[int, str], fired: threading.Event
) -> None:
    dump_id, text = entry
    try:
        cur.execute(text)
    except psycopg2.errors.QueryCanceled:
        if fired.is_set():
            raise _TimedOut from None
        errors[dump_id] = "canceling statement due to statement timeout"
    except psycopg2.OperationalError:
        raise
    except psycopg2.Error as err:
        errors[dump_id] = _message(err)


def _has_sql(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("--") for line in text.splitlines())


def _message(err: psycopg2.Error) -> str:
    diag = getattr(err, "diag", None)
    if diag is not None and diag.message_primary:
        return str(diag.message_primary)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_RISKY_CHECKS = """
WITH RECURSIVE reach(constraint_oid, root, fn, depth) AS (
    SELECT k.oid, d.refobjid, d.refobjid, 0
    FROM pg_catalog.pg_constraint k
    JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_constraint'::pg_catalog.regclass
      AND d.objid OPERATOR(pg_catalog.=) k.oid
      AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
    WHERE k.contype OPERATOR(pg_catalog.=) 'c' AND k.convalidated
  UNION
    -- Functions those call, told by their names followed by "(" in the caller's body.
    SELECT r.constraint_oid, r.root, callee.oid, r.depth OPERATOR(pg_catalog.+) 1
    FROM reach r
    JOIN pg_catalog.pg_proc caller ON caller.oid OPERATOR(pg_catalog.=) r.fn
    JOIN pg_catalog.pg_proc callee ON callee.oid OPERATOR(pg_catalog.<>) caller.oid
    JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) callee.pronamespace
      AND cn.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema'])
    WHERE r.depth OPERATOR(pg_catalog.<) 4
      AND (
          -- Called unqualified (not as another schema's function of the same name)...
          caller.prosrc OPERATOR(pg_catalog.~*) (
              '(^|[^."[:alnum:]_])"?'
              OPERATOR(pg_catalog.||) pg_catalog.regexp_replace(callee.proname, '([^a-zA-Z0-9_])', '\\\\\\1', 'g')
              OPERATOR(pg_catalog.||) '"?\\s*\\(')
          -- ...or qualified with its own schema.
          OR caller.prosrc OPERATOR(pg_catalog.~*) (
              '\\m"?' OPERATOR(pg_catalog.||) pg_catalog.regexp_replace(cn.nspname, '([^a-zA-Z0-9_])', '\\\\\\1', 'g')
              OPERATOR(pg_catalog.||) '"?\\."?'
              OPERATOR(pg_catalog.||) pg_catalog.regexp_replace(callee.proname, '([^a-zA-Z0-9_])', '\\\\\\1', 'g')
              OPERATOR(pg_catalog.||) '"?\\s*\\(')
      )
)
SELECT CASE WHEN c.oid IS NULL THEN 'domain' ELSE 'table' END,
       COALESCE(n.nspname, yn.nspname), COALESCE(c.relname, y.typname),
       k.conname, pn.nspname, p.proname,
       pg_catalog.string_agg(DISTINCT tn.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) t.relname, ', ')
FROM reach r
JOIN pg_catalog.pg_constraint k ON k.oid OPERATOR(pg_catalog.=) r.constraint_oid
LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) k.conrelid
LEFT JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
LEFT JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) k.contypid
LEFT JOIN pg_catalog.pg_namespace yn ON yn.oid OPERATOR(pg_catalog.=) y.typnamespace
JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) r.root
JOIN pg_catalog.pg_namespace pn ON pn.oid OPERATOR(pg_catalog.=) p.pronamespace
JOIN pg_catalog.pg_proc body ON body.oid OPERATOR(pg_catalog.=) r.fn
JOIN pg_catalog.pg_namespace bn ON bn.oid OPERATOR(pg_catalog.=) body.pronamespace
JOIN pg_catalog.pg_class t ON t.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'v', 'm', 'f']::"char"[])
  AND (c.oid IS NULL OR t.oid OPERATOR(pg_catalog.<>) c.oid)
JOIN pg_catalog.pg_namespace tn ON tn.oid OPERATOR(pg_catalog.=) t.relnamespace
WHERE bn.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema'])
  AND tn.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema'])
  AND body.prosrc OPERATOR(pg_catalog.~*) (
      '\\m(from|join|update|into|table)\\s+(only\\s+)?("?[^\\s."]+"?\\.)?"?'
      OPERATOR(pg_catalog.||) pg_catalog.regexp_replace(t.relname, '([^a-zA-Z0-9_])', '\\\\\\1', 'g')
      OPERATOR(pg_catalog.||) '("|\\M)')
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 1, 2, 3, 4, 5, 6
"""


def risky_checks(scratch: Scratch, deadline: Deadline) -> list[str]:
    """CHECK constraints that call a function whose body reads another table (names it
    after FROM, JOIN, UPDATE or INTO): refused, with what to change. (Functions of extensions are in their schemas' names too, but
    their bodies are C symbols or the extension's own SQL, which names no user table.)"""
    with scratch.admin.role_connection(scratch.database, scratch.login) as conn, _cancel_at(conn, deadline):
        with conn.cursor() as cur:
            cur.execute(_RISKY_CHECKS)
            rows = cur.fetchall()
        conn.rollback()
    fix = {
        "table": "Make it a trigger, or re-add it as NOT VALID (ALTER TABLE {0} ADD CONSTRAINT … NOT VALID: "
        "pg_dump then adds it after the data), and dump again",
        "domain": "Move the check to a trigger on the tables whose columns use the domain, and dump again",
    }
    return [
        f"CHECK constraint {constraint} of {kind} {schema}.{name} calls {fschema}.{function}(), which reads "
        f"another table ({tables}): a restore loads each table's rows with its CHECK constraints in place, "
        "before the other tables are loaded and with search_path empty, so the rows fail it. "
        + fix[kind].format(f"{schema}.{name}")
        for kind, schema, name, constraint, fschema, function, tables in rows
    ]


def foreign_role_policies(scratch: Scratch, deadline: Deadline) -> list[dict[str, Any]]:
    """Policies the rehearsal created for roles other than PUBLIC (which only exist on
    the cluster as other tenants' or the service's): skipped, with the reason."""
    with scratch.admin.role_connection(scratch.database, scratch.login) as conn, _cancel_at(conn, deadline):
        rows = inventory.policies_for_roles(conn)
        conn.rollback()
    return [
        {
            "object": f"POLICY {schema}.{table} {policy}",
            "reason": f"it is for role(s) {roles}, which a project cannot have: a project's policies are for "
            "PUBLIC or roles the project creates; recreate it for the project's roles after the import",
            "key": ["POLICY", schema, f"{table} {policy}"],
        }
        for schema, table, policy, roles in rows
    ]


def _unlisted(dump_id: int) -> str:
    return "the statements before the first object" if dump_id == PREAMBLE else f"TOC entry {dump_id}"


def _left_out_reason(plan: toc.RestorePlan, entry: toc.TocEntry) -> str | None:
    return next((item["reason"] for item in plan.skipped if item["object"] == entry.label), None)


def judge(
    nodes: list[Node], errors: Mapping[int, str], left_out: Mapping[int, str] | None = None
) -> Rehearsal:
    """Split the failed entries (and what depends on them) into skipped and refused.
    `left_out`: entries the restore plan skips anyway (id -> reason), not rehearsed:
    what depends on them is skipped (or refused) with them, they are not listed again."""
    left_out = left_out or {}
    errors = {**left_out, **errors}
    by_id = {node.entry.dump_id: node for node in nodes}
    dependents: dict[int, list[int]] = {}
    for dependent in nodes:
        for dep in dependent.depends_on:
            dependents.setdefault(dep, []).append(dependent.entry.dump_id)

    def closure(root: int) -> list[int]:
        seen, todo = [root], [root]
        while todo:
            for child in dependents.get(todo.pop(), []):
                if child not in seen:
                    seen.append(child)
                    todo.append(child)
        return seen

    result = Rehearsal()
    roots = [dump_id for dump_id in errors if dump_id in left_out or _MANAGED.search(errors[dump_id])]
    covered: dict[int, int] = {}  # entry -> the managed root it depends on
    for root in roots:
        for dump_id in closure(root):
            covered.setdefault(dump_id, root)
    refused_roots = {
        root
        for dump_id, root in covered.items()
        if dump_id in by_id and by_id[dump_id].entry.desc in DATA_KINDS
    }
    for dump_id, root in covered.items():
        node = by_id.get(dump_id)
        if node is None or root in refused_roots or dump_id in left_out:
            continue
        if dump_id == root:
            reason = f"a managed database cannot hold it as the project's role ({errors[root]})"
        else:
            reason = f"it depends on {by_id[root].entry.label}, which is skipped ({errors[root]})"
        result.skipped.append({"object": node.entry.label, "reason": reason, "key": list(node.key)})
    for root in sorted(refused_roots):
        needed = [
            by_id[dump_id].entry.label
            for dump_id in closure(root)
            if dump_id in by_id and by_id[dump_id].entry.desc in DATA_KINDS
        ]
        result.refused.append(
            f"{by_id[root].entry.label}: {errors[root]}; needed by {', '.join(needed)}. A managed database "
            "cannot hold it as the project's role: change those to not use it (another type or function), "
            "or drop it from the source, and import again"
        )
    for dump_id, message in errors.items():
        if dump_id not in covered:
            label = by_id[dump_id].entry.label if dump_id in by_id else _unlisted(dump_id)
            result.refused.append(f"{label}: {message}")
    return result


@dataclass(frozen=True)
class RehearsalSetup:
    """What a preflight needs to rehearse: where (`sandbox`), with which tools, by which
    `deadline` (started with the preflight), in which scratch folder. `full` is the
    worker's gate: running out of time there fails the check; the API's synchronous
    preflight only warns, since the worker rehearses again, with its own limit, before
    anything is dropped."""

    sandbox: Sandbox
    tools: PgTools
    deadline: Deadline
    work_dir: str
    full: bool = False
    lock_wait_ms: int = 10_000


def report_rehearsal(report: Preflight, result: Rehearsal, *, full: bool, scope: str = "") -> None:
    """The `schema_rehearsal` check, from a rehearsal's result; `scope` says what part
    was rehearsed when not all of it (" in the first 8.0 MiB of the dump")."""
    report.skipped = list(result.skipped)
    skipped = "; ".join(f"{item['object']} ({item['reason']})" for item in result.skipped)
    if result.unavailable:
        report.not_checked(SCHEMA_REHEARSAL, result.unavailable)
    elif result.refused:
        also = f". Besides, the import would leave out: {skipped}" if skipped else ""
        report.add(
            SCHEMA_REHEARSAL,
            FAIL,
            f"the schema does not restore as the project's role ({len(result.refused)} problem(s)): "
            + "; ".join(result.refused)
            + also,
        )
    elif result.timed_out:
        if full:
            report.add(
                SCHEMA_REHEARSAL,
                FAIL,
                f"the schema rehearsal did not finish within {result.timed_out}; ask the operator to raise it",
            )
        else:
            report.add(
                SCHEMA_REHEARSAL,
                WARN,
                f"not finished within {result.timed_out}; the import rehearses the whole schema before "
                "anything is dropped, and fails then if it does not restore",
            )
    elif result.skipped:
        report.add(
            SCHEMA_REHEARSAL,
            WARN,
            f"the schema{scope} restored as the project's role into a throw-away database, except "
            f"{len(result.skipped)} object(s) a managed database cannot hold, which the import leaves out "
            f"(listed in its report as skipped): {skipped}",
        )
    else:
        implied = (
            f"; its {result.implied} plain tables, keys and btree indexes restore with their schemas "
            "and tables, and were not run"
            if result.implied
            else ""
        )
        report.add(
            SCHEMA_REHEARSAL,
            PASS,
            f"the schema{scope} ({result.rehearsed} objects) restored as the project's role into a throw-away "
            f"database without errors{implied}",
        )
