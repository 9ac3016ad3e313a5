"""Configuration: every `CAPY_*` environment variable is read here, once.

`Settings.from_env()` is called at the edges (the WSGI factory, the worker module, the
CLI); everything else receives a `Settings` object. Defaults run against the local
services (Postgres and RabbitMQ on 127.0.0.1, SeaweedFS on :8333) with nothing set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from stages.extensions import DEFAULT_EXTENSION_ALLOWLIST

# Only for local development and tests: a real deployment sets CAPY_SECRET_KEY.
DEV_SECRET_KEY = "capy-imports-development-secret-do-not-use-in-production"


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


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


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
    secret_key: str = field(default=DEV_SECRET_KEY, repr=False)
    extension_allowlist: tuple[str, ...] = DEFAULT_EXTENSION_ALLOWLIST
    allow_private_sources: bool = False
    work_dir: str = "/tmp/capy-imports"
    concurrency: int = 2
    pg_bin_dir_template: str = "/usr/lib/postgresql/{major}/bin"
    source_connect_timeout: int = 10
    max_attempts: int = 3
    stage_time_limit_seconds: int = 6 * 3600
    replaced_database_retention_seconds: int = 7 * 24 * 3600
    max_body_bytes: int = 64 * 1024
    max_active_uploads_per_project: int = 5
    # An upload whose form expired unused is deleted by sweep only this long after.
    upload_unused_grace_seconds: int = 3600
    # What the synchronous preflight reads of an upload, at most: compressed bytes
    # from storage, and text decompressed from a gzipped plain dump.
    preflight_head_bytes: int = 8 * 1024 * 1024
    preflight_text_bytes: int = 64 * 1024 * 1024

    @property
    def uses_dev_secret(self) -> bool:
        return self.secret_key == DEV_SECRET_KEY

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
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
            secret_key=env.get("CAPY_SECRET_KEY") or d.secret_key,
            extension_allowlist=_list(env, "CAPY_EXTENSION_ALLOWLIST", d.extension_allowlist),
            allow_private_sources=_bool(env, "CAPY_ALLOW_PRIVATE_SOURCES", d.allow_private_sources),
            work_dir=env.get("CAPY_WORK_DIR") or d.work_dir,
            concurrency=_int(env, "CAPY_CONCURRENCY", d.concurrency),
            pg_bin_dir_template=env.get("CAPY_PG_BIN_DIR") or d.pg_bin_dir_template,
            source_connect_timeout=_int(env, "CAPY_SOURCE_CONNECT_TIMEOUT", d.source_connect_timeout),
            max_attempts=_int(env, "CAPY_MAX_ATTEMPTS", d.max_attempts),
            stage_time_limit_seconds=_int(env, "CAPY_STAGE_TIME_LIMIT_SECONDS", d.stage_time_limit_seconds),
            replaced_database_retention_seconds=_int(
                env,
                "CAPY_REPLACED_DATABASE_RETENTION_SECONDS",
                d.replaced_database_retention_seconds,
            ),
            max_body_bytes=_int(env, "CAPY_MAX_BODY_BYTES", d.max_body_bytes),
            max_active_uploads_per_project=_int(
                env, "CAPY_MAX_ACTIVE_UPLOADS_PER_PROJECT", d.max_active_uploads_per_project
            ),
            upload_unused_grace_seconds=_int(env, "CAPY_UPLOAD_UNUSED_GRACE_SECONDS", d.upload_unused_grace_seconds),
            preflight_head_bytes=_int(env, "CAPY_PREFLIGHT_HEAD_BYTES", d.preflight_head_bytes),
            preflight_text_bytes=_int(env, "CAPY_PREFLIGHT_TEXT_BYTES", d.preflight_text_bytes),
        )
