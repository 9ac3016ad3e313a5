"""`capy-imports`: the operators' command line.

Every command prints what it did; with `--json` it prints exactly one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import peewee
import psycopg2

from pipeline import accounts, apikeys, cancellation, jobs, logs, restore_slots, services
from pipeline.accounts import cluster_admin
from pipeline.clock import run_clock
from pipeline.config import ConfigError, Settings
from pipeline.deadletters import DeadLetters
from pipeline.errors import InvalidRequest, NotFound
from pipeline.import_steps import preview_name
from pipeline.migrations import migrate
from pipeline.models import ApiKey, Cluster, Job, Organization, Project, utcnow
from pipeline.operator_actions import operator_actor, retry_job, stage_names, stuck_jobs
from pipeline.principals import SCOPES
from pipeline.rotation import rotate_secrets
from pipeline.serialize import job_json, timestamp
from pipeline.sweep import sweep
from pipeline.webhooks import commands as webhook_commands
from pipeline.webhooks.queue import WebhookQueue, relay
from stages.connections.pgurl import redact
from stages.errors import CapyError, ObjectMissing
from stages.storage import ObjectStore


def _org(org: Organization) -> dict[str, Any]:
    return {
        "id": org.id,
        "name": org.name,
        "clerk_org_id": org.clerk_org_id,
        "plan": org.plan,
        "created_at": timestamp(org.created_at),
    }


def _cluster(cluster: Cluster) -> dict[str, Any]:
    return {
        "id": cluster.id,
        "name": cluster.name,
        "server_major": cluster.server_major,
        "restore_limit": cluster.restore_limit,
        "created_at": timestamp(cluster.created_at),
    }


def _restore_limit_text(cluster: Cluster, settings: Settings) -> str:
    if cluster.restore_limit is not None:
        return f"at most {cluster.restore_limit} restores at once (its own limit)"
    return f"at most {settings.cluster_restore_limit} restores at once (CAPY_CLUSTER_RESTORE_LIMIT)"


def _project(project: Project) -> dict[str, Any]:
    return {
        "id": project.id,
        "organization_id": project.organization_id,
        "cluster_id": project.cluster_id,
        "name": project.name,
        "database_name": project.database_name,
        "role_name": project.role_name,
        "storage_limit_bytes": project.storage_limit_bytes,
        "created_at": timestamp(project.created_at),
    }


def _key(record: ApiKey) -> dict[str, Any]:
    return {
        "id": record.id,
        "organization_id": record.organization_id,
        "project_id": record.project_id,
        "name": record.name,
        "key_prefix": record.key_prefix,
        "scopes": record.scopes,
        "state": apikeys.key_state(record),
        "created_at": timestamp(record.created_at),
        "expires_at": timestamp(record.expires_at),
        "revoked_at": timestamp(record.revoked_at),
        "last_used_at": timestamp(record.last_used_at),
    }


def _expiry(args: argparse.Namespace) -> dt.datetime | None:
    if args.expires_in is not None:
        if args.expires_in <= 0:
            raise InvalidRequest("--expires-in must be a positive number of days")
        return utcnow() + dt.timedelta(days=args.expires_in)
    if args.expires_at is not None:
        try:
            at = dt.datetime.fromisoformat(args.expires_at)
        except ValueError:
            raise InvalidRequest(
                f"--expires-at must be an ISO 8601 time such as 2027-01-31T00:00:00Z, not {args.expires_at!r}"
            ) from None
        at = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
        if at <= utcnow():
            raise InvalidRequest(f"--expires-at must be in the future, not {args.expires_at}")
        return at
    return None


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, obj: dict[str, Any], text: str) -> None:
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str))
        else:
            print(text)


def cmd_migrate(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    applied = migrate(settings.database_url)
    text = (
        f"applied {len(applied)} migration(s): {', '.join(applied)}"
        if applied
        else "the control database is up to date"
    )
    out.emit({"applied": applied}, text)


def cmd_orgs_create(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    org = accounts.create_organization(args.name, clerk_org_id=args.clerk_org_id)
    out.emit(_org(org), f"created organization {org.id} ({org.name})")


def cmd_clusters_add(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    cluster = accounts.add_cluster(args.name, args.admin_url, services.sealer(settings))
    out.emit(
        _cluster(cluster), f"added cluster {cluster.id} ({cluster.name}, PostgreSQL {cluster.server_major})"
    )


def cmd_clusters_list(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    rows = []
    lines = []
    for cluster in Cluster.select().order_by(Cluster.created_at):
        use = restore_slots.in_use(
            cluster, default_limit=settings.cluster_restore_limit, lease=_lease(settings)
        )
        rows.append(
            {
                **_cluster(cluster),
                "restores_in_use": use.in_use,
                "restores_waiting": use.ahead,
                "effective_restore_limit": use.limit,
            }
        )
        lines.append(
            f"{cluster.id}  {cluster.name}  PostgreSQL {cluster.server_major}  restores {use.in_use} of "
            f"{use.limit} in use"
            + ("" if cluster.restore_limit is not None else " (default limit)")
            + (f", {use.ahead} waiting" if use.ahead else "")
        )
    out.emit({"clusters": rows}, "\n".join(lines) if lines else "no clusters")


def cmd_clusters_set_restore_limit(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    if args.default == (args.limit is not None):
        raise InvalidRequest(
            "give either a limit (a whole number, at least 1) or --default, not both or neither"
        )
    cluster = restore_slots.set_cluster_limit(args.cluster, None if args.default else args.limit)
    out.emit(
        {
            **_cluster(cluster),
            "effective_restore_limit": restore_slots.limit_of(cluster, settings.cluster_restore_limit),
        },
        f"cluster {cluster.id} ({cluster.name}) now takes {_restore_limit_text(cluster, settings)}; "
        "restores already running keep their slots",
    )


def cmd_projects_create(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    org = accounts.get_organization(args.org)
    kwargs: dict[str, Any] = {"cluster_id": args.cluster}
    if args.storage_limit_bytes is not None:
        kwargs["storage_limit_bytes"] = args.storage_limit_bytes
    project = accounts.create_project(org, args.name, services.sealer(settings), **kwargs)
    out.emit(
        _project(project),
        f"created project {project.id} ({project.name}) with database {project.database_name}",
    )


def cmd_keys_create(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    org = accounts.get_organization(args.org)
    project = None
    if args.project:
        project = accounts.get_project(args.project)
    created = apikeys.create_key(
        org, project, name=args.name or "", scopes=args.scope, expires_at=_expiry(args)
    )
    record = created.record
    obj = {**_key(record), "key": created.plaintext}
    scope = f"project {project.id}" if project else f"organization {org.id}"
    expiry = f", expires {obj['expires_at']}" if record.expires_at else ""
    out.emit(
        obj,
        f"created API key {record.id} for {scope} (scopes {', '.join(record.scopes)}{expiry}); "
        f"it is shown only once:\n{created.plaintext}",
    )


def cmd_keys_list(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    org = accounts.get_organization(args.org)
    rows = [_key(record) for record in apikeys.list_keys(org)]
    lines = [
        f"{k['id']}  {k['state']:<7}  {k['key_prefix']}…  {','.join(k['scopes'])}  "
        f"{k['project_id'] or 'all projects'}  {k['name']}"
        for k in rows
    ]
    out.emit({"keys": rows}, "\n".join(lines) if lines else f"organization {org.id} has no API keys")


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    record, revoked = apikeys.revoke_key(args.key)
    text = (
        f"revoked API key {record.id} ({record.key_prefix}…); requests with it now get 401"
        if revoked
        else f"API key {record.id} was already revoked at {timestamp(record.revoked_at)}; nothing to do"
    )
    out.emit({**_key(record), "revoked": revoked}, text)


def cmd_secrets_rotate(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    done = rotate_secrets(services.sealer(settings))
    summary = "; ".join(
        f"{kind}: {counts['resealed']} re-sealed with the current key, {counts['current']} already current"
        for kind, counts in done["secrets"].items()
    )
    if done["unreadable"]:
        raise InvalidRequest(
            f"{summary}; but {len(done['unreadable'])} cannot be decrypted with any key in CAPY_SECRET_KEY "
            f"({', '.join(done['unreadable'])}): add the key they were sealed with and run this again"
        )
    out.emit(done, summary.replace("; ", "\n"))


def _operator_job(job: Job) -> dict[str, Any]:
    """The published job object plus what operators need: the holder's last heartbeat."""
    return {**job_json(job), "heartbeat_at": timestamp(job.heartbeat_at)}


def _holder(j: dict[str, Any]) -> str:
    if not j["claimed_by"]:
        return "unclaimed"
    return f"held by {j['claimed_by']}, heartbeat {j['heartbeat_at'] or 'never'}"


def cmd_jobs_list(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    if args.stuck:
        found = stuck_jobs(lease=_lease(settings), unclaimed_for=dt.timedelta(seconds=args.stuck_after))
        picked = [s for s in found if (not args.project or s.job.project_id == args.project)][: args.limit]
        rows = [{**_operator_job(s.job), "stuck": s.why} for s in picked]
    else:
        query = Job.select().order_by(Job.created_at.desc()).limit(args.limit)
        if args.project:
            query = query.where(Job.project == args.project)
        if args.state:
            query = query.where(Job.state == args.state)
        rows = [_operator_job(job) for job in query]
    lines = [
        f"{j['id']}  {j['state']:<9}  {j['stage']:<9}  {j['project_id']}  {j['created_at']}"
        + (f"  {_holder(j)}" if j["state"] in ("pending", "running") else "")
        + (f"  stuck: {j['stuck']}" if "stuck" in j else "")
        + (f"  {j['error']}" if j["error"] else "")
        for j in rows
    ]
    empty = "no stuck jobs" if args.stuck else "no jobs"
    out.emit({"jobs": rows}, "\n".join(lines) if lines else empty)


def cmd_jobs_show(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    job = Job.get_or_none(Job.id == args.job)
    if job is None:
        raise NotFound(f"job {args.job} does not exist")
    obj = _operator_job(job)
    obj["events"] = [
        {
            "at": timestamp(e.at),
            "actor": e.actor,
            "from_state": e.from_state,
            "to_state": e.to_state,
            "from_stage": e.from_stage,
            "to_stage": e.to_stage,
            "reason": e.reason,
        }
        for e in jobs.events(job.id)
    ]
    text = "\n".join(
        [f"{k}: {v}" for k, v in obj.items() if k not in ("events", "report", "progress")]
        + [f"progress: {json.dumps(obj['progress'])}"]
        + ([f"report: {json.dumps(obj['report'], indent=2)}"] if "report" in obj else [])
        + ["events:"]
        + [
            f"  {e['at']}  {e['actor']}  {e['from_state']}/{e['from_stage']} -> {e['to_state']}/{e['to_stage']}  {e['reason']}"
            for e in obj["events"]
        ]
    )
    out.emit(obj, text)


def _lease(settings: Settings) -> dt.timedelta:
    """How long a claim holds without a heartbeat (CAPY_LEASE_SECONDS)."""
    return dt.timedelta(seconds=settings.lease_seconds)


def cmd_jobs_cancel(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    steps = services.import_steps(settings)
    outcome = cancellation.request_cancel(
        args.job,
        operator_actor(),
        lease=_lease(settings),
        cleanup=lambda job: steps.cleanup(job, succeeded=False),
    )
    job = outcome.job
    if outcome.done:
        text = f"cancelled job {job.id} at its {job.stage} stage; project {job.project_id} is free for a new import"
    else:
        text = (
            f"asked {job.claimed_by}, which runs the {job.stage} stage of job {job.id}, to stop it; "
            f"the job ends cancelled within seconds (capy-imports jobs show {job.id})"
        )
    out.emit({**_operator_job(job), "cancelled_now": outcome.done}, text)


def cmd_jobs_retry(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    sealer = services.sealer(settings)
    store = services.object_store(settings)
    queue = services.stage_queue(settings)
    try:
        outcome = retry_job(
            args.job,
            operator_actor(),
            from_stage=args.from_stage,
            wake=queue.wake,
            upload_exists=lambda key: _stored(store, key),
            preview_exists=lambda job: cluster_admin(
                Cluster.get_by_id(job.cluster_id), sealer
            ).database_exists(preview_name(job)),
        )
    finally:
        queue.broker.close()
    job = outcome.job
    text = (
        f"job {job.id} ({outcome.from_state} at {outcome.from_stage}) is pending again at its {job.stage} "
        f"stage with its attempts reset"
        + ("; a worker picks it up now" if outcome.woken else "")
        + (f"; {outcome.note}" if outcome.note else "")
    )
    out.emit({**_operator_job(job), "note": outcome.note, "woken": outcome.woken}, text)


def _stored(store: ObjectStore, key: str) -> bool:
    try:
        store.size(key)
    except ObjectMissing:
        return False
    return True


def _dead_letters(settings: Settings) -> DeadLetters:
    return DeadLetters(settings.broker_url, settings.queue_prefix, lease=_lease(settings))


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "age unknown"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def cmd_dlq_list(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    now = utcnow()
    letters = [letter.summary(now) for letter in _dead_letters(settings).read()]
    lines = [
        f"{m['job_id'] or '?'}  {m['stage']:<9}  {_age(m['age_seconds']):<9}  retries {m['retries'] if m['retries'] is not None else 0}  {m['failure']}"
        for m in letters
    ]
    empty = f"no dead-lettered messages in {settings.queue_prefix}.<stage>.XQ"
    out.emit({"messages": letters}, "\n".join(lines) if lines else empty)


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    if not args.all and not args.job:
        raise InvalidRequest("say which messages to replay: --job ID, or --all")
    now = utcnow()
    decisions = _dead_letters(settings).replay(
        operator_actor(), job_id=args.job, dry_run=args.dry_run, drop_ended=args.drop_ended
    )
    rows = [decision.as_dict(now) for decision in decisions]
    lines = [
        f"{r['action']}: {r['job_id'] or '?'} {r['stage']} ({r['message_id']}): {r['reason']}" for r in rows
    ]
    scope = f"job {args.job}" if args.job else "any job"
    out.emit(
        {"messages": rows, "dry_run": args.dry_run},
        "\n".join(lines) if lines else f"no dead-lettered messages for {scope}",
    )


def _sweep_once(settings: Settings) -> dict[str, Any]:
    """One sweep, re-waking stuck jobs through the broker."""
    queue = services.stage_queue(settings)
    try:
        done = sweep(settings, services.sealer(settings), services.object_store(settings), wake=queue.wake)
        try:
            done["webhook_deliveries_sent"] = relay(WebhookQueue(queue.broker, settings).send)
        except CapyError as err:  # the broker went away: the next round sends them
            done["errors"].append(f"webhook deliveries: {err.message}")
        return done
    finally:
        queue.broker.close()


def _sweep_text(done: dict[str, Any]) -> str:
    lines = (
        [f"woke job {w['job']} ({w['stage']}): {w['why']}" for w in done.get("jobs_woken", [])]
        + [f"removed work directory {name}" for name in done.get("work_dirs_removed", [])]
        + [f"re-enabled connections to database {name}" for name in done.get("databases_reopened", [])]
        + [f"deleted upload {key}" for key in done.get("uploads_deleted", [])]
        + [f"dropped replaced database {name}" for name in done.get("replaced_databases_dropped", [])]
        + [f"dropped orphaned preview {name}" for name in done.get("previews_dropped", [])]
        + [f"dropped restore role {name}" for name in done.get("restore_roles_dropped", [])]
        + [f"dropped schema rehearsal {name}" for name in done.get("rehearsals_dropped", [])]
        + [f"made spare database {name}" for name in done.get("spares_made", [])]
        + [f"dropped spare database {name}" for name in done.get("spares_dropped", [])]
        + [f"revoked PUBLIC's access to database {name}" for name in done.get("databases_locked_down", [])]
        + [
            f"sent webhook delivery {w['delivery']} (attempt {w['attempt']})"
            for w in done.get("webhook_deliveries_sent", [])
        ]
        + [f"could not clean {item}" for item in done.get("errors", [])]
    )
    return "\n".join(lines) if lines else "nothing to sweep"


def cmd_sweep(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    done = _sweep_once(settings)
    out.emit(done, _sweep_text(done))


def cmd_clock(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    logs.configure(settings.log_format, settings.log_level)
    services.sealer(settings)  # refuse to start without CAPY_SECRET_KEY, not at the first round
    if args.every <= 0:
        raise InvalidRequest(f"--every must be a number of seconds above 0, not {args.every}")

    def report(done: dict[str, Any]) -> None:
        out.emit(done, f"[{timestamp(utcnow())}] " + _sweep_text(done).replace("\n", "\n  "))
        sys.stdout.flush()

    run_clock(args.every, lambda: _sweep_once(settings), report)


def cmd_dev_seed(args: argparse.Namespace, settings: Settings, out: Output) -> None:
    """Idempotent local set-up for `make run`: org, local cluster, project, fresh key."""
    sealer = services.sealer(settings)
    org = Organization.get_or_none(Organization.name == "Dev organization") or accounts.create_organization(
        "Dev organization"
    )
    cluster = Cluster.get_or_none(Cluster.name == "local") or accounts.add_cluster(
        "local", args.cluster_url, sealer
    )
    project = Project.get_or_none(
        (Project.organization == org.id) & (Project.name == "dev")
    ) or accounts.create_project(org, "dev", sealer, cluster_id=cluster.id)
    key = apikeys.create_key(org, project, name="make run").plaintext
    base = f"http://127.0.0.1:{args.port}"
    example = (
        f"curl -sS -X POST {base}/v1/projects/{project.id}/imports \\\n"
        f"  -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        '  -d \'{"confirm": true, "recreate": true, '
        '"source_url": "postgresql://postgres@127.0.0.1:5432/chinook?sslmode=disable"}\''
    )
    text = "\n".join(
        [
            f"organization {org.id}, cluster {cluster.id} (PostgreSQL {cluster.server_major}), "
            f"project {project.id} (database {project.database_name})",
            f"API key (project-scoped, shown once): {key}",
            "dev mode (CAPY_ENV=development): loopback and private source addresses are allowed, "
            "secrets are sealed with the public development key",
            "",
            "Load a sample source:  psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -f tests/corpus/chinook.sql",
            "Import it:",
            example,
            f"Then poll:  curl -sS {base}/v1/jobs/<job id> -H 'Authorization: Bearer {key}'",
        ]
    )
    out.emit(
        {"organization": _org(org), "cluster": _cluster(cluster), "project": _project(project), "key": key},
        text,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capy-imports", description="Operate CapyDB Imports.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(parent: Any, name: str, func: Callable[..., None], help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
        p.set_defaults(func=func)
        return p

    add(sub, "migrate", cmd_migrate, "create or upgrade the control database")

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(dest="sub", required=True)
    p = add(orgs, "create", cmd_orgs_create, "create an organization")
    p.add_argument("--name", required=True)
    p.add_argument("--clerk-org-id")

    clusters = sub.add_parser("clusters", help="Postgres clusters").add_subparsers(dest="sub", required=True)
    p = add(clusters, "add", cmd_clusters_add, "register a cluster")
    p.add_argument("--name", required=True)
    p.add_argument("--admin-url", required=True)
    add(clusters, "list", cmd_clusters_list, "list clusters with their restore limits and restores in use")
    p = add(
        clusters,
        "set-restore-limit",
        cmd_clusters_set_restore_limit,
        "set how many imports may restore into a cluster at once, or --default (CAPY_CLUSTER_RESTORE_LIMIT)",
    )
    p.add_argument("cluster", metavar="CLUSTER_ID")
    p.add_argument("limit", metavar="N", type=int, nargs="?", help="at most N restores at once (at least 1)")
    p.add_argument("--default", action="store_true", help="follow CAPY_CLUSTER_RESTORE_LIMIT again")

    projects = sub.add_parser("projects", help="projects").add_subparsers(dest="sub", required=True)
    p = add(projects, "create", cmd_projects_create, "create a project and its empty database")
    p.add_argument("--org", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--cluster")
    p.add_argument("--storage-limit-bytes", type=int)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
    p = add(keys, "create", cmd_keys_create, "create an API key (printed once)")
    p.add_argument("--org", required=True)
    p.add_argument("--project")
    p.add_argument("--name")
    p.add_argument(
        "--scope",
        action="extend",
        nargs="+",
        choices=SCOPES,
        metavar="SCOPE",
        help=f"one or more of {', '.join(SCOPES)} (default: all of them)",
    )
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=int, metavar="DAYS")
    expiry.add_argument("--expires-at", metavar="ISO8601")
    p = add(keys, "list", cmd_keys_list, "list an organization's API keys (never the keys themselves)")
    p.add_argument("--org", required=True)
    p = add(keys, "revoke", cmd_keys_revoke, "revoke an API key at once")
    p.add_argument("key", metavar="KEY_ID")

    secrets_parser = sub.add_parser("secrets", help="stored secrets").add_subparsers(
        dest="sub", required=True
    )
    add(
        secrets_parser,
        "rotate",
        cmd_secrets_rotate,
        "re-seal every stored secret with the first key of CAPY_SECRET_KEY",
    )

    jobs_parser = sub.add_parser("jobs", help="import jobs").add_subparsers(dest="sub", required=True)
    p = add(jobs_parser, "list", cmd_jobs_list, "list jobs, newest first")
    p.add_argument("--project")
    p.add_argument("--state", choices=["pending", "running", "completed", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument(
        "--stuck",
        action="store_true",
        help="only active jobs whose holder stopped heartbeating, or that nobody claimed for --stuck-after",
    )
    p.add_argument("--stuck-after", type=int, default=300, metavar="SECONDS")
    p = add(jobs_parser, "show", cmd_jobs_show, "show a job with its events")
    p.add_argument("job")
    p = add(jobs_parser, "cancel", cmd_jobs_cancel, "cancel a pending or running import")
    p.add_argument("job")
    p = add(jobs_parser, "retry", cmd_jobs_retry, "run a failed or cancelled import again")
    p.add_argument("job")
    p.add_argument(
        "--from-stage",
        choices=stage_names(),
        help="default: the stage it failed at (fetch after restore or finalize)",
    )

    dlq = sub.add_parser("dlq", help="dead-lettered stage messages").add_subparsers(dest="sub", required=True)
    add(dlq, "list", cmd_dlq_list, "list dead-lettered messages (they stay in the queue)")
    p = add(dlq, "replay", cmd_dlq_replay, "put dead-lettered messages back on their stage queue")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--job", help="only this job's messages")
    which.add_argument("--all", action="store_true", help="every message")
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed, change nothing")
    p.add_argument(
        "--drop-ended",
        action="store_true",
        help="remove the messages of jobs that ended or are unknown (no replay can be right for them)",
    )

    webhook_commands.register(sub, add)

    add(
        sub,
        "sweep",
        cmd_sweep,
        "re-wake stuck jobs; delete expired uploads, replaced databases, orphaned previews and work files",
    )
    p = add(sub, "clock", cmd_clock, "run sweep every --every seconds until SIGTERM (the Procfile's clock)")
    p.add_argument("--every", type=float, default=60.0, metavar="SECONDS")

    p = add(sub, "dev-seed", cmd_dev_seed, "set up a local organization, cluster, project and key")
    p.add_argument("--cluster-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--port", type=int, default=8000)
    return parser


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args.json)
    garbled = _not_utf8(args)
    if garbled:
        # Bytes the terminal's encoding could not decode reach us as lone surrogates, which
        # nothing downstream can encode; the value itself may hold a password.
        return _error(args, f"{garbled} is not valid UTF-8 text; type it again in UTF-8")
    try:
        settings = settings or Settings.from_env()
        if args.func is not cmd_migrate:
            services.control_database(settings)
        args.func(args, settings, out)
    except CapyError as err:
        return _error(args, err.message)
    except ConfigError as err:
        return _error(args, str(err))
    except BrokenPipeError:
        # The reader went away (`capy-imports jobs list | head`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (peewee.PeeweeException, psycopg2.Error) as err:
        reason = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        return _error(
            args,
            f"cannot use the control database ({reason}); check CAPY_DATABASE_URL and that "
            "Postgres is running, then run: capy-imports migrate",
        )
    return 0


def _not_utf8(args: argparse.Namespace) -> str | None:
    """The first argument whose value is not valid UTF-8 text, named as its option is."""
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "the value given for " + dest.replace("_", "-")
    return None


def _error(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"error": message}), file=sys.stdout)
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
