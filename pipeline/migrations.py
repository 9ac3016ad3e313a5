"""Schema migrations of the control database, applied in order, each once.

`migrate()` is idempotent: it takes an advisory lock (so two `release` processes do
not race), creates the control database if it is missing, applies only the versions
not yet recorded in `schema_migrations`, and revokes PUBLIC's CONNECT and TEMPORARY
on the control database.
"""

from __future__ import annotations

from typing import Any

import psycopg2
from psycopg2 import sql

from pipeline.db import connect_params

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE organizations (
            id text PRIMARY KEY,
            name text NOT NULL,
            clerk_org_id text UNIQUE,
            plan text NOT NULL DEFAULT 'free',
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE clusters (
            id text PRIMARY KEY,
            name text NOT NULL UNIQUE,
            admin_url_encrypted text NOT NULL,
            server_major integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE projects (
            id text PRIMARY KEY,
            organization_id text NOT NULL REFERENCES organizations(id),
            cluster_id text NOT NULL REFERENCES clusters(id),
            name text NOT NULL,
            database_name text NOT NULL UNIQUE,
            storage_limit_bytes bigint NOT NULL CHECK (storage_limit_bytes > 0),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX projects_organization_id ON projects (organization_id);
        CREATE TABLE api_keys (
            id text PRIMARY KEY,
            organization_id text NOT NULL REFERENCES organizations(id),
            project_id text REFERENCES projects(id),
            key_prefix text NOT NULL UNIQUE,
            key_hash text NOT NULL,
            name text NOT NULL DEFAULT '',
            scopes jsonb NOT NULL DEFAULT '[]',
            expires_at timestamptz,
            revoked_at timestamptz,
            last_used_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE jobs (
            id text PRIMARY KEY,
            type text NOT NULL,
            state text NOT NULL CHECK (state IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
            stage text NOT NULL CHECK (stage IN ('preflight', 'fetch', 'restore', 'finalize')),
            progress jsonb NOT NULL DEFAULT '{}',
            organization_id text NOT NULL REFERENCES organizations(id),
            project_id text NOT NULL REFERENCES projects(id),
            cluster_id text NOT NULL REFERENCES clusters(id),
            locked_resource text,
            preview_database_id text,
            attempts integer NOT NULL DEFAULT 0,
            max_attempts integer NOT NULL DEFAULT 3,
            claimed_by text,
            claimed_at timestamptz,
            heartbeat_at timestamptz,
            started_at timestamptz,
            completed_at timestamptz,
            error text,
            retry_classification text CHECK (retry_classification IN ('transient', 'permanent')),
            last_exit_code integer,
            last_stdout text,
            last_stderr text,
            source_url_encrypted text,
            source_url_redacted text,
            upload_key text,
            recreate boolean NOT NULL DEFAULT false,
            idempotency_key text,
            facts jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            CHECK ((source_url_encrypted IS NULL) <> (upload_key IS NULL))
        );
        -- One active import per project: the second insert fails, atomically.
        CREATE UNIQUE INDEX jobs_one_active_per_resource
            ON jobs (locked_resource) WHERE state IN ('pending', 'running');
        CREATE UNIQUE INDEX jobs_idempotency ON jobs (project_id, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE INDEX jobs_project_created ON jobs (project_id, created_at DESC);
        CREATE TABLE job_events (
            id bigserial PRIMARY KEY,
            job_id text NOT NULL REFERENCES jobs(id),
            at timestamptz NOT NULL DEFAULT now(),
            actor text NOT NULL,
            from_state text,
            to_state text,
            from_stage text,
            to_stage text,
            reason text NOT NULL
        );
        CREATE INDEX job_events_job ON job_events (job_id, id);
        CREATE TABLE audit_events (
            id text PRIMARY KEY,
            organization_id text NOT NULL REFERENCES organizations(id),
            project_id text REFERENCES projects(id),
            action text NOT NULL,
            actor text NOT NULL,
            target_id text,
            details jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX audit_events_project ON audit_events (project_id, created_at DESC);
        CREATE TABLE retired_databases (
            id bigserial PRIMARY KEY,
            cluster_id text NOT NULL REFERENCES clusters(id),
            project_id text NOT NULL REFERENCES projects(id),
            job_id text NOT NULL REFERENCES jobs(id),
            database_name text NOT NULL,
            drop_after timestamptz NOT NULL,
            dropped_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        "0002_project_roles",
        """
        -- Each project's database is owned by a login role of its own (not a superuser);
        -- restores run as that role. Its password is stored encrypted.
        ALTER TABLE projects ADD COLUMN role_name text UNIQUE;
        ALTER TABLE projects ADD COLUMN role_password_encrypted text;
        """,
    ),
    (
        "0003_auth",
        """
        -- API key scopes get the names the API checks: imports:write -> projects:write,
        -- imports:read -> jobs:read; new keys default to both.
        UPDATE api_keys SET scopes = (
            SELECT coalesce(jsonb_agg(DISTINCT CASE s
                WHEN 'imports:write' THEN 'projects:write'
                WHEN 'imports:read' THEN 'jobs:read'
                ELSE s END), '[]'::jsonb)
            FROM jsonb_array_elements_text(api_keys.scopes) AS s
        ) WHERE scopes ?| ARRAY['imports:write', 'imports:read'];
        ALTER TABLE api_keys ALTER COLUMN scopes SET DEFAULT '["projects:write", "jobs:read"]';
        -- The Idempotency-Key's request: a keyed digest of the canonical request, so a
        -- reused key with a different body is refused instead of answering the first job.
        ALTER TABLE jobs ADD COLUMN request_hash text;
        ALTER TABLE jobs ADD CONSTRAINT jobs_idempotency_key_length
            CHECK (char_length(idempotency_key) <= 255) NOT VALID;
        -- Per-credential request counters on fixed one-minute windows, shared by every
        -- web worker. UNLOGGED: losing counters in a crash only forgives a minute.
        CREATE UNLOGGED TABLE rate_limits (
            credential text NOT NULL,
            window_start timestamptz NOT NULL,
            hits integer NOT NULL,
            PRIMARY KEY (credential, window_start)
        );
        """,
    ),
    (
        "0004_uploads",
        """
        -- Every upload form issued: what it may hold, until when, and which job used it,
        -- so that an unused or re-uploaded object can be swept and issuance limited.
        CREATE TABLE uploads (
            id text PRIMARY KEY,
            project_id text NOT NULL REFERENCES projects(id),
            object_key text NOT NULL UNIQUE,
            max_bytes bigint NOT NULL CHECK (max_bytes >= 0),
            expires_at timestamptz NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            job_id text REFERENCES jobs(id),
            deleted_at timestamptz
        );
        CREATE INDEX uploads_project_unused ON uploads (project_id, expires_at)
            WHERE job_id IS NULL AND deleted_at IS NULL;
        -- Uploads issued before this table existed, from their audit events, so that
        -- their keys stay importable and sweepable.
        INSERT INTO uploads (id, project_id, object_key, max_bytes, expires_at, created_at, job_id, deleted_at)
        SELECT 'upl_' || substr(md5(a.target_id), 1, 20), a.project_id, a.target_id, p.storage_limit_bytes,
               COALESCE((a.details->>'expires_at')::timestamptz, a.created_at), a.created_at,
               (SELECT j.id FROM jobs j WHERE j.upload_key = a.target_id ORDER BY j.created_at DESC LIMIT 1),
               (SELECT now() FROM jobs j WHERE j.upload_key = a.target_id AND j.facts ? 'upload_deleted' LIMIT 1)
        FROM audit_events a JOIN projects p ON p.id = a.project_id
        WHERE a.action = 'project.import_upload_created' AND a.target_id IS NOT NULL
        ON CONFLICT (object_key) DO NOTHING;
        """,
    ),
    (
        "0005_fair_share",
        """
        -- Fair share: a claim counts the organization's jobs that hold a claim.
        CREATE INDEX jobs_organization_claimed ON jobs (organization_id)
            WHERE claimed_by IS NOT NULL AND state IN ('pending', 'running');
        """,
    ),
    (
        "0007_operators",
        """
        -- Cancel: a request against a running stage is a marker its worker's heartbeat
        -- thread reads (it then stops the stage's tools); who asked, for the job's error.
        ALTER TABLE jobs ADD COLUMN cancel_requested_at timestamptz;
        ALTER TABLE jobs ADD COLUMN cancel_requested_by text;
        """,
    ),
    (
        "0008_restore_slots",
        """
        -- Per-cluster limit on concurrent restores; NULL follows CAPY_CLUSTER_RESTORE_LIMIT.
        ALTER TABLE clusters ADD COLUMN restore_limit integer CHECK (restore_limit > 0);
        -- A restore slot (acquired_at set), or a place in the cluster's queue for one
        -- (queued_at), belongs to one claim of a job's restore stage (claimed_by and
        -- claimed_at as the job row had them): it counts only while that claim still
        -- holds the job with a fresh heartbeat (pipeline.restore_slots), so a dead
        -- worker's slot frees itself; rows of ended claims are deleted lazily.
        CREATE TABLE restore_slots (
            job_id text PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
            cluster_id text NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
            claimed_by text NOT NULL,
            claimed_at timestamptz NOT NULL,
            queued_at timestamptz NOT NULL,
            acquired_at timestamptz
        );
        CREATE INDEX restore_slots_cluster ON restore_slots (cluster_id);
        """,
    ),
    (
        "0009_webhooks",
        """
        -- Webhook endpoints of an organization; the secret that signs deliveries is
        -- stored sealed like every other secret. Removing one keeps it (removed_at),
        -- so its deliveries stay listable.
        CREATE TABLE webhook_endpoints (
            id text PRIMARY KEY,
            organization_id text NOT NULL REFERENCES organizations(id),
            url text NOT NULL CHECK (char_length(url) <= 2048),
            description text NOT NULL DEFAULT '',
            secret_encrypted text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            removed_at timestamptz
        );
        CREATE INDEX webhook_endpoints_organization ON webhook_endpoints (organization_id)
            WHERE removed_at IS NULL;
        -- An event, recorded in the transaction of the job's state change it tells of
        -- (the outbox): `payload` is the exact body every attempt sends.
        CREATE TABLE webhook_events (
            id text PRIMARY KEY,
            organization_id text NOT NULL REFERENCES organizations(id),
            type text NOT NULL CHECK (type IN ('job.completed', 'job.failed', 'import.completed')),
            job_id text REFERENCES jobs(id),
            payload text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        -- One event to one endpoint: up to 8 attempts, each recorded below.
        CREATE TABLE webhook_deliveries (
            id text PRIMARY KEY,
            event_id text NOT NULL REFERENCES webhook_events(id),
            endpoint_id text NOT NULL REFERENCES webhook_endpoints(id),
            state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            -- Set while an attempt is in flight, so no second one starts meanwhile.
            locked_until timestamptz,
            last_status_code integer,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            completed_at timestamptz
        );
        CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at DESC);
        CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
        CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (next_attempt_at)
            WHERE state = 'pending';
        CREATE TABLE webhook_attempts (
            id bigserial PRIMARY KEY,
            delivery_id text NOT NULL REFERENCES webhook_deliveries(id),
            attempt integer NOT NULL,
            at timestamptz NOT NULL,
            status_code integer,
            error text,
            duration_ms integer NOT NULL,
            UNIQUE (delivery_id, attempt)
        );
        """,
    ),
]

_LOCK_KEY = 7_314_002  # arbitrary, constant: serialises concurrent migrate runs


def ensure_database(url: str) -> bool:
    """Create the control database if it does not exist; True if it was created."""
    name, params = connect_params(url)
    options: dict[str, Any] = {"connect_timeout": 5, **params, "dbname": "postgres"}
    conn = psycopg2.connect(**options)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True
    finally:
        conn.close()


def migrate(url: str) -> list[str]:
    """Apply pending migrations; return the versions applied by this call."""
    ensure_database(url)
    name, params = connect_params(url)
    options: dict[str, Any] = {"connect_timeout": 5, **params, "dbname": name}
    conn = psycopg2.connect(**options)
    applied: list[str] = []
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                cur.execute(statements)
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
            # The control database may share a cluster with tenants' databases: no role
            # but its owner (and superusers) may connect to it or create temporary
            # objects there. Idempotent; a no-op with a warning if we are not its owner.
            cur.execute(
                sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name))
            )
    finally:
        conn.close()
    return applied
