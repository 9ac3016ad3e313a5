"""Configuration: every `CAPY_*` environment variable is read here, once.

`Settings.from_env()` is called at the edges (the WSGI factory, the worker module, the
CLI); everything else receives a `Settings` object. Defaults run against the local
services (Postgres and RabbitMQ on 127.0.0.1, SeaweedFS on :8333) with nothing set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from stages.preflight.extensions import DEFAULT_EXTENSION_ALLOWLIST
from stages.tools.commands import DEFAULT_COMMAND_TIMEOUT_SECONDS, DEFAULT_STALL_SECONDS

# Only for development mode (CAPY_ENV=development): it is public, so production refuses it.
MIN_SECRET_KEY_LENGTH = 32
DEV_SECRET_KEY = "capy-imports-development-secret-do-not-use-in-production"

# Seconds between failed webhook attempts: after attempt 1, 2, …; the last repeats.
WEBHOOK_RETRY_SECONDS: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200)

PRODUCTION = "production"
DEVELOPMENT = "development"
ENVIRONMENTS = (PRODUCTION, DEVELOPMENT)


class ConfigError(ValueError):
    """A CAPY_* variable has a value the service cannot use."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _memory(env: Mapping[str, str], name: str, default: str) -> str:
    """A Postgres memory setting ("256MB", "1GB", "65536kB"), checked before it reaches a server."""
    value = (env.get(name) or default).strip()
    if not re.fullmatch(r"[1-9][0-9]*(kB|MB|GB)", value):
        raise ConfigError(f"{name} must be a size such as 256MB or 1GB (kB, MB or GB), not {value!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None


def _positive(env: Mapping[str, str], name: str, default: int, *, rule: str = "a whole number of seconds above 0") -> int:
    value = _int(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name} must be {rule}, not {value}")
    return value


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _delays(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        values = tuple(float(item) for item in raw.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{name} must be numbers of seconds (0 or more) separated by commas, not {raw!r}")
    return values


def _split_keys(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


LOG_FORMATS = ("json", "text")


def _log_format(env: Mapping[str, str], dev: bool) -> str:
    raw = (env.get("CAPY_LOG_FORMAT") or ("text" if dev else "json")).strip().lower()
    if raw not in LOG_FORMATS:
        raise ConfigError(f"CAPY_LOG_FORMAT must be json or text, not {raw!r}")
    return raw


def _environment(env: Mapping[str, str]) -> str:
    raw = (env.get("CAPY_ENV") or PRODUCTION).strip().lower()
    if raw not in ENVIRONMENTS:
        raise ConfigError(f"CAPY_ENV must be production or development, not {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/capy_imports"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue_prefix: str = "capy"
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_public_endpoint: str = "http://127.0.0.1:8333"
    s3_region: str = "us-east-1"
    s3_bucket: str = "capy-imports"
    s3_access_key: str = "capyadmin"
    s3_secret_key: str = field(default="capysecret", repr=False)
    upload_url_expiry_seconds: int = 3600
    upload_retention_seconds: int = 0
    # One key, or several separated by commas: the first encrypts, all decrypt (rotation).
    # Empty in production until CAPY_SECRET_KEY is set; see `secret_keys`.
    secret_key: str = field(default="", repr=False)
    extension_allowlist: tuple[str, ...] = DEFAULT_EXTENSION_ALLOWLIST
    allow_private_sources: bool = False
    work_dir: str = "/tmp/capy-imports"
    concurrency: int = 2
    # Per session of the copy on the target cluster (index builds): memory of the cluster, not the worker.
    maintenance_work_mem: str = "256MB"
    pg_bin_dir_template: str = "/usr/lib/postgresql/{major}/bin"
    source_connect_timeout: int = 10
    max_attempts: int = 3
    # Below the broker's consumer timeout (see broker_consumer_timeout_seconds).
    stage_time_limit_seconds: int = 25 * 60
    replaced_database_retention_seconds: int = 7 * 24 * 3600
    max_body_bytes: int = 64 * 1024
    environment: str = PRODUCTION
    clerk_jwks_url: str = ""
    clerk_issuer: str = ""
    clerk_authorized_parties: tuple[str, ...] = ()
    rate_limit_per_minute: int = 120

    # Below gunicorn's --timeout (30 s in the Procfiles): a synchronous preflight answers first.
    preflight_deadline_seconds: int = 20
    source_read_timeout_seconds: int = 1800
    # Every external command (pg_dump, pg_restore, psql) is stopped after this long...
    command_timeout_seconds: int = DEFAULT_COMMAND_TIMEOUT_SECONDS
    # ...or after this long without progress (output, or a dump's files growing).
    command_stall_seconds: int = DEFAULT_STALL_SECONDS
    # The short commands of preflight (pg_restore --list on an upload's head).
    preflight_command_timeout_seconds: int = 15
    # A job's whole run, from its first claim: no command runs past it.
    job_time_limit_seconds: int = 4 * 3600
    # Fair share: jobs of one organization running a stage at once.
    org_max_active_jobs: int = 2
    # How long a job waiting for its organization's other imports waits before it looks again.
    org_wait_retry_seconds: int = 30
    # Imports restoring into one target cluster at once (its restore stage), unless the
    # cluster has a limit of its own (`capy-imports clusters set-restore-limit`).
    cluster_restore_limit: int = 4
    max_active_uploads_per_project: int = 5
    # An upload whose form expired unused is deleted by sweep only this long after.
    upload_unused_grace_seconds: int = 3600
    # What the synchronous preflight reads of an upload, at most: compressed bytes
    # from storage, and text decompressed from a gzipped plain dump.
    preflight_head_bytes: int = 8 * 1024 * 1024
    preflight_text_bytes: int = 64 * 1024 * 1024
    # Synchronous preflights one organization may run at once (each holds a web thread).
    org_max_concurrent_preflights: int = 2
    # How long a live import waits for a lock on a source table (the snapshot's LOCK
    # TABLE and pg_dump's --lock-wait-timeout) before failing as transient.
    source_lock_timeout_seconds: int = 60
    # RabbitMQ's consumer_timeout as the deployment configures it (rabbitmq.conf; 30 min
    # by default): a message unacknowledged for longer is taken back and its channel
    # closed, so every stage must end (by its time limit) before it.
    broker_consumer_timeout_seconds: int = 1800
    # A claim whose heartbeat is older than this can be taken over (its worker died);
    # heartbeats come every sixth of it.
    lease_seconds: int = 90
    # Tests only: "point=seconds,…" makes the first attempt of a stage hold at a point
    # (restore: a psql sleeping in the preview; swap: inside the swap's transaction),
    # so a fault-injection test can kill the worker there. Never set in production.
    test_holds: str = ""
    # How long `POST …/imports` waits for RabbitMQ to confirm the job's first wake-up (and
    # the readiness check for the broker to answer). Past it the job is answered 202,
    # recorded and "queued for dispatch": the web process and the sweep publish it later.
    publish_deadline_seconds: int = 3
    # pika's blocked_connection_timeout for the web's publishing connection: a connection
    # RabbitMQ keeps blocked (connection.blocked: a memory or disk alarm) this long is
    # closed and opened again, so one stuck publish does not hold every later one.
    broker_blocked_timeout_seconds: int = 30
    # The waits between a webhook delivery's attempts (pipeline.webhooks.delivery).
    webhook_retry_seconds: tuple[float, ...] = WEBHOOK_RETRY_SECONDS
    # Log lines: "json" (one object a line) or "text"; json unless in development mode.
    log_format: str = "json"
    # The bearer token that reads GET /metrics; without one /metrics is open in
    # development mode and refused in production.
    metrics_token: str = field(default="", repr=False)

    def hold_seconds(self, point: str) -> float:
        """How long the first attempt holds at `point` (CAPY_TEST_HOLDS), 0 if not at all."""
        for item in _split_keys(self.test_holds):
            name, _, seconds = item.partition("=")
            if name.strip() == point:
                return float(seconds or 0)
        return 0.0

    @property
    def dev_mode(self) -> bool:
        return self.environment == DEVELOPMENT

    @property
    def uses_dev_secret(self) -> bool:
        return DEV_SECRET_KEY in _split_keys(self.secret_key)

    def secret_keys(self) -> tuple[str, ...]:
        """The keys that seal and open stored secrets, current first.

        Raises ConfigError when the service must not start: no CAPY_SECRET_KEY outside
        development mode, or the public development key in production.
        """
        keys = _split_keys(self.secret_key)
        if not keys:
            raise ConfigError(
                "CAPY_SECRET_KEY is not set: set it to a long random string (it encrypts the "
                "secrets the service stores), or set CAPY_ENV=development for local development"
            )
        if not self.dev_mode and DEV_SECRET_KEY in keys:
            raise ConfigError(
                "CAPY_SECRET_KEY holds the public development key, which production refuses: "
                "set it to a long random string of your own"
            )
        if not self.dev_mode and len(keys[0]) < MIN_SECRET_KEY_LENGTH:
            # Only the current key: older ones are kept to open what they sealed.
            raise ConfigError(
                f"CAPY_SECRET_KEY's current (first) key has {len(keys[0])} characters; production needs "
                f"at least {MIN_SECRET_KEY_LENGTH}: set it to a long random string, e.g. `openssl rand -hex 32`"
            )
        return keys

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        environment = _environment(env)
        dev = environment == DEVELOPMENT
        return cls(
            database_url=env.get("CAPY_DATABASE_URL") or d.database_url,
            broker_url=env.get("CAPY_BROKER_URL") or d.broker_url,
            queue_prefix=env.get("CAPY_QUEUE_PREFIX") or d.queue_prefix,
            s3_endpoint=env.get("CAPY_S3_ENDPOINT") or d.s3_endpoint,
            s3_public_endpoint=env.get("CAPY_S3_PUBLIC_ENDPOINT")
            or env.get("CAPY_S3_ENDPOINT")
            or d.s3_public_endpoint,
            s3_region=env.get("CAPY_S3_REGION") or d.s3_region,
            s3_bucket=env.get("CAPY_S3_BUCKET") or d.s3_bucket,
            s3_access_key=env.get("CAPY_S3_ACCESS_KEY") or d.s3_access_key,
            s3_secret_key=env.get("CAPY_S3_SECRET_KEY") or d.s3_secret_key,
            upload_url_expiry_seconds=_int(
                env, "CAPY_UPLOAD_URL_EXPIRY_SECONDS", d.upload_url_expiry_seconds
            ),
            upload_retention_seconds=_int(env, "CAPY_UPLOAD_RETENTION_SECONDS", d.upload_retention_seconds),
            # Development mode implies the development defaults: the public key, private sources.
            secret_key=env.get("CAPY_SECRET_KEY") or (DEV_SECRET_KEY if dev else d.secret_key),
            extension_allowlist=_list(env, "CAPY_EXTENSION_ALLOWLIST", d.extension_allowlist),
            allow_private_sources=_bool(env, "CAPY_ALLOW_PRIVATE_SOURCES", dev or d.allow_private_sources),
            work_dir=env.get("CAPY_WORK_DIR") or d.work_dir,
            concurrency=_positive(env, "CAPY_CONCURRENCY", d.concurrency, rule="a whole number above 0"),
            maintenance_work_mem=_memory(env, "CAPY_MAINTENANCE_WORK_MEM", d.maintenance_work_mem),
            pg_bin_dir_template=env.get("CAPY_PG_BIN_DIR") or d.pg_bin_dir_template,
            source_connect_timeout=_int(env, "CAPY_SOURCE_CONNECT_TIMEOUT", d.source_connect_timeout),
            max_attempts=_positive(
                env,
                "CAPY_MAX_ATTEMPTS",
                d.max_attempts,
                rule="at least 1 (how many times a stage may be tried; 1 means no retry)",
            ),
            stage_time_limit_seconds=_positive(env, "CAPY_STAGE_TIME_LIMIT_SECONDS", d.stage_time_limit_seconds),
            replaced_database_retention_seconds=_int(
                env,
                "CAPY_REPLACED_DATABASE_RETENTION_SECONDS",
                d.replaced_database_retention_seconds,
            ),
            max_body_bytes=_int(env, "CAPY_MAX_BODY_BYTES", d.max_body_bytes),
            environment=environment,
            clerk_jwks_url=(env.get("CAPY_CLERK_JWKS_URL") or "").strip(),
            clerk_issuer=(env.get("CAPY_CLERK_ISSUER") or "").strip(),
            clerk_authorized_parties=_list(env, "CAPY_CLERK_AUTHORIZED_PARTIES", d.clerk_authorized_parties),
            rate_limit_per_minute=_int(env, "CAPY_RATE_LIMIT_PER_MINUTE", d.rate_limit_per_minute),
            preflight_deadline_seconds=_positive(env, "CAPY_PREFLIGHT_DEADLINE_SECONDS", d.preflight_deadline_seconds),
            source_read_timeout_seconds=_positive(
                env, "CAPY_SOURCE_READ_TIMEOUT_SECONDS", d.source_read_timeout_seconds
            ),
            command_timeout_seconds=_positive(env, "CAPY_COMMAND_TIMEOUT_SECONDS", d.command_timeout_seconds),
            command_stall_seconds=_positive(env, "CAPY_COMMAND_STALL_SECONDS", d.command_stall_seconds),
            preflight_command_timeout_seconds=_positive(
                env, "CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS", d.preflight_command_timeout_seconds
            ),
            job_time_limit_seconds=_positive(env, "CAPY_JOB_TIME_LIMIT_SECONDS", d.job_time_limit_seconds),
            org_max_active_jobs=_positive(env, "CAPY_ORG_MAX_ACTIVE_JOBS", d.org_max_active_jobs, rule="at least 1"),
            org_wait_retry_seconds=_positive(env, "CAPY_ORG_WAIT_RETRY_SECONDS", d.org_wait_retry_seconds),
            cluster_restore_limit=_positive(
                env, "CAPY_CLUSTER_RESTORE_LIMIT", d.cluster_restore_limit, rule="at least 1"
            ),
            max_active_uploads_per_project=_int(
                env, "CAPY_MAX_ACTIVE_UPLOADS_PER_PROJECT", d.max_active_uploads_per_project
            ),
            upload_unused_grace_seconds=_int(env, "CAPY_UPLOAD_UNUSED_GRACE_SECONDS", d.upload_unused_grace_seconds),
            preflight_head_bytes=_int(env, "CAPY_PREFLIGHT_HEAD_BYTES", d.preflight_head_bytes),
            preflight_text_bytes=_int(env, "CAPY_PREFLIGHT_TEXT_BYTES", d.preflight_text_bytes),
            org_max_concurrent_preflights=_positive(
                env, "CAPY_ORG_MAX_CONCURRENT_PREFLIGHTS", d.org_max_concurrent_preflights, rule="at least 1"
            ),
            source_lock_timeout_seconds=_positive(env, "CAPY_SOURCE_LOCK_TIMEOUT_SECONDS", d.source_lock_timeout_seconds),
            broker_consumer_timeout_seconds=_positive(
                env, "CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS", d.broker_consumer_timeout_seconds
            ),
            lease_seconds=_positive(env, "CAPY_LEASE_SECONDS", d.lease_seconds),
            test_holds=env.get("CAPY_TEST_HOLDS") or d.test_holds,
            publish_deadline_seconds=_positive(env, "CAPY_PUBLISH_DEADLINE_SECONDS", d.publish_deadline_seconds),
            broker_blocked_timeout_seconds=_positive(
                env, "CAPY_BROKER_BLOCKED_TIMEOUT_SECONDS", d.broker_blocked_timeout_seconds
            ),
            webhook_retry_seconds=_delays(env, "CAPY_WEBHOOK_RETRY_SECONDS", d.webhook_retry_seconds),
            log_format=_log_format(env, dev),
            metrics_token=(env.get("CAPY_METRICS_TOKEN") or "").strip(),
        ).checked()

    def checked(self) -> Settings:
        """Refuse combinations the service cannot run with (ConfigError)."""
        if self.max_attempts < 1:
            raise ConfigError(
                f"CAPY_MAX_ATTEMPTS must be at least 1 (how many times a stage may be tried; 1 means no retry), "
                f"not {self.max_attempts}: with {self.max_attempts} every job would fail before it starts"
            )
        if self.stage_time_limit_seconds >= self.broker_consumer_timeout_seconds:
            raise ConfigError(
                f"CAPY_STAGE_TIME_LIMIT_SECONDS ({self.stage_time_limit_seconds}) must be below "
                f"CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS ({self.broker_consumer_timeout_seconds}), RabbitMQ's "
                "consumer_timeout: a stage still running when the broker's timeout passes loses its message. "
                "For big imports raise both together: consumer_timeout in rabbitmq.conf and "
                "CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS, then CAPY_STAGE_TIME_LIMIT_SECONDS below it"
            )
        if self.publish_deadline_seconds > 20:
            raise ConfigError(
                f"CAPY_PUBLISH_DEADLINE_SECONDS ({self.publish_deadline_seconds}) must be at most 20: a POST "
                "waits that long for the broker, well inside gunicorn's 30 s request timeout"
            )
        if self.test_holds and not self.dev_mode:
            raise ConfigError("CAPY_TEST_HOLDS is for fault-injection tests only (development mode); unset it")
        return self
