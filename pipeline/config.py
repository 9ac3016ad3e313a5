"""Configuration: every `CAPY_*` environment variable is read here, once, and validated.

`Settings.from_env()` is called at the edges (the WSGI factory, the worker module, the
CLI); everything else receives a `Settings` object. Defaults run against the local
services (Postgres and RabbitMQ on 127.0.0.1, SeaweedFS on :8333) with nothing set.

`Settings` is a pydantic-settings model: each field is read from `CAPY_<FIELD NAME>`
(two have names of their own: `CAPY_ENV`, `CAPY_PG_BIN_DIR`), converted, and checked
against its range. Anything wrong raises one `ConfigError` naming every bad variable,
its value (secrets hidden) and what is allowed — never a pydantic traceback. Building
`Settings(...)` directly reads no environment (tests, benchmarks), and
`settings.replace(...)` validates its changes the same way.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.db import connect_params
from stages.connections.pgurl import redact_conninfo
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
LOG_FORMATS = ("json", "text")

ENV_PREFIX = "CAPY_"
# S3's presigned URLs (signature version 4) live at most 7 days.
MAX_PRESIGNED_SECONDS = 7 * 24 * 3600
# A POST waits this long at most for the broker, well inside gunicorn's 30 s timeout.
MAX_PUBLISH_DEADLINE_SECONDS = 20


class ConfigError(ValueError):
    """A CAPY_* variable has a value the service cannot use."""


def _setting(default: Any, rule: str, *, secret: bool = False, url: bool = False, **constraints: Any) -> Any:
    """A field with its range (`ge`, `le`, `pattern`, …) and the `rule` a refusal states.

    `secret`: the value never appears in a message or the repr; `url`: it appears
    with its password redacted.
    """
    return Field(
        default,
        repr=not secret,
        json_schema_extra={"rule": rule, "secret": secret, "url": url},
        **constraints,
    )


# The longest any duration may be: every one is added to a datetime or a timedelta
# somewhere (a lease, a job's time limit, a retention, a webhook's next attempt), and
# past about 8,000 years that raises OverflowError in every stage or attempt that uses it.
MAX_SECONDS = 10 * 365 * 24 * 3600  # 10 years


def _seconds(default: int, *, minimum: int = 1) -> Any:
    rule = "a whole number of seconds above 0" if minimum == 1 else "a whole number of seconds, 0 or more"
    return _setting(default, rule, ge=minimum, le=MAX_SECONDS)


def _split_keys(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


CommaList = Annotated[tuple[str, ...], NoDecode]
Delays = Annotated[
    tuple[Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)], ...],
    NoDecode,
    Field(min_length=1),
]


class Settings(BaseSettings):
    """The service's settings; see README.md, "Configuration", for each variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # CAPY_X= (empty) means the default, as it always has
        frozen=True,
        extra="forbid",
        str_strip_whitespace=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    database_url: str = _setting(
        "postgresql://postgres@127.0.0.1:5432/capy_imports",
        "a postgresql:// URL or a libpq connection string (host=… dbname=…)",
        url=True,
    )
    broker_url: str = _setting(
        "amqp://guest:guest@127.0.0.1:5672/%2F", "an amqp:// URL", url=True, min_length=1
    )
    queue_prefix: str = _setting("capy", "a name for the queues", min_length=1)
    s3_endpoint: str = _setting("http://127.0.0.1:8333", "an http(s):// URL", min_length=1)
    # Defaults to CAPY_S3_ENDPOINT (see _derived_defaults).
    s3_public_endpoint: str = _setting("http://127.0.0.1:8333", "an http(s):// URL", min_length=1)
    s3_region: str = _setting("us-east-1", "an S3 region name", min_length=1)
    s3_bucket: str = _setting("capy-imports", "an S3 bucket name", min_length=1)
    s3_access_key: str = _setting("capyadmin", "an S3 access key", min_length=1)
    s3_secret_key: str = _setting("capysecret", "an S3 secret key", secret=True, min_length=1)
    upload_url_expiry_seconds: int = _setting(
        3600,
        f"a whole number of seconds from 1 to {MAX_PRESIGNED_SECONDS} (7 days, the most S3 presigns for)",
        ge=1,
        le=MAX_PRESIGNED_SECONDS,
    )
    upload_retention_seconds: int = _seconds(0, minimum=0)
    # One key, or several separated by commas: the first encrypts, all decrypt (rotation).
    # Empty in production until CAPY_SECRET_KEY is set; see `secret_keys`.
    secret_key: str = _setting("", "one or more keys separated by commas", secret=True)
    extension_allowlist: CommaList = _setting(
        DEFAULT_EXTENSION_ALLOWLIST, "extension names separated by commas"
    )
    allow_private_sources: bool = _setting(False, "true or false")
    work_dir: str = _setting("/tmp/capy-imports", "a directory", min_length=1)
    concurrency: int = _setting(2, "a whole number above 0", ge=1)
    # Empty databases kept ready on each project cluster (stages.database.spares).
    spare_databases: int = _setting(2, "a whole number from 0 to 20", ge=0, le=20)
    # Per session of the copy on the target cluster (index builds): memory of the cluster, not the
    # worker. PostgreSQL's own default: more made mix's trigram GIN build slower beside the
    # other lane's copy, not faster (bench/README.md).
    maintenance_work_mem: str = _setting(
        "64MB", "a size such as 256MB or 1GB (kB, MB or GB)", pattern=r"^[1-9][0-9]*(kB|MB|GB)$"
    )
    pg_bin_dir_template: str = _setting(
        "/usr/lib/postgresql/{major}/bin",
        "a directory, with {major} for the cluster's major version",
        validation_alias="CAPY_PG_BIN_DIR",
        min_length=1,
    )
    source_connect_timeout: int = _seconds(10)
    max_attempts: int = _setting(
        3, "at least 1 (how many times a stage may be tried; 1 means no retry)", ge=1
    )
    # A stage that failed transiently runs again after this to twice this (Dramatiq's
    # jitter); the wait doubles at each retry, and one past 5 minutes is 2.5 to 5 minutes
    # (pipeline.queue.MAX_BACKOFF_MS): above half of that, nothing would double.
    retry_backoff_seconds: int = _setting(5, "a whole number of seconds from 1 to 150", ge=1, le=150)
    # Below the broker's consumer timeout (see broker_consumer_timeout_seconds).
    stage_time_limit_seconds: int = _seconds(25 * 60)
    replaced_database_retention_seconds: int = _seconds(7 * 24 * 3600, minimum=0)
    max_body_bytes: int = _setting(64 * 1024, "a whole number of bytes above 0", ge=1)
    environment: Literal["production", "development"] = _setting(
        PRODUCTION, "production or development", validation_alias="CAPY_ENV"
    )
    clerk_jwks_url: str = _setting("", "an https:// URL")
    clerk_issuer: str = _setting("", "Clerk's Frontend API URL")
    clerk_authorized_parties: CommaList = _setting((), "origins separated by commas")
    rate_limit_per_minute: int = _setting(120, "a whole number, 0 or more (0: no limit)", ge=0)

    # Below gunicorn's --timeout (30 s in the Procfiles): a synchronous preflight answers first.
    preflight_deadline_seconds: int = _seconds(20)
    source_read_timeout_seconds: int = _seconds(1800)
    # Every external command (pg_dump, pg_restore, psql) is stopped after this long...
    command_timeout_seconds: int = _seconds(DEFAULT_COMMAND_TIMEOUT_SECONDS)
    # ...or after this long without progress (output, or a dump's files growing).
    command_stall_seconds: int = _seconds(DEFAULT_STALL_SECONDS)
    # The short commands of preflight (pg_restore --list on an upload's head).
    preflight_command_timeout_seconds: int = _seconds(15)
    # A job's whole run, from its first claim: no command runs past it.
    job_time_limit_seconds: int = _seconds(4 * 3600)
    # Fair share: jobs of one organization running a stage at once.
    org_max_active_jobs: int = _setting(2, "at least 1", ge=1)
    # How long a job waiting for its organization's other imports waits before it looks again.
    org_wait_retry_seconds: int = _seconds(30)
    # Imports restoring into one target cluster at once (its restore stage), unless the
    # cluster has a limit of its own (`capy-imports clusters set-restore-limit`).
    cluster_restore_limit: int = _setting(4, "at least 1", ge=1)
    max_active_uploads_per_project: int = _setting(5, "at least 1", ge=1)
    # An upload whose form expired unused is deleted by sweep only this long after.
    upload_unused_grace_seconds: int = _seconds(3600, minimum=0)
    # What the synchronous preflight reads of an upload, at most: compressed bytes
    # from storage, and text decompressed from a gzipped plain dump.
    preflight_head_bytes: int = _setting(8 * 1024 * 1024, "a whole number of bytes above 0", ge=1)
    preflight_text_bytes: int = _setting(64 * 1024 * 1024, "a whole number of bytes above 0", ge=1)
    # Synchronous preflights one organization may run at once (each holds a web thread).
    org_max_concurrent_preflights: int = _setting(2, "at least 1", ge=1)
    # How long a live import waits for a lock on a source table (the snapshot's LOCK
    # TABLE and pg_dump's --lock-wait-timeout) before failing as transient.
    source_lock_timeout_seconds: int = _seconds(60)
    # RabbitMQ's consumer_timeout as the deployment configures it (rabbitmq.conf; 30 min
    # by default): a message unacknowledged for longer is taken back and its channel
    # closed, so every stage must end (by its time limit) before it.
    broker_consumer_timeout_seconds: int = _seconds(1800)
    # A claim whose heartbeat is older than this can be taken over (its worker died);
    # heartbeats come every sixth of it.
    lease_seconds: int = _seconds(90)
    # Tests only: "point=seconds,…" makes the first attempt of a stage hold at a point
    # (restore: a psql sleeping in the preview; swap: inside the swap's transaction),
    # so a fault-injection test can kill the worker there. Never set in production.
    test_holds: str = _setting("", "point=seconds pairs separated by commas")
    # How long `POST …/imports` waits for RabbitMQ to confirm the job's first wake-up (and
    # the readiness check for the broker to answer). Past it the job is answered 202,
    # recorded and "queued for dispatch": the web process and the sweep publish it later.
    publish_deadline_seconds: int = _setting(
        3,
        f"a whole number of seconds above 0 and at most {MAX_PUBLISH_DEADLINE_SECONDS} (a POST waits "
        "that long for the broker, well inside gunicorn's 30 s request timeout)",
        ge=1,
        le=MAX_PUBLISH_DEADLINE_SECONDS,
    )
    # pika's blocked_connection_timeout for the web's publishing connection: a connection
    # RabbitMQ keeps blocked (connection.blocked: a memory or disk alarm) this long is
    # closed and opened again, so one stuck publish does not hold every later one.
    broker_blocked_timeout_seconds: int = _seconds(30)
    # The waits between a webhook delivery's attempts (pipeline.webhooks.delivery).
    webhook_retry_seconds: Delays = _setting(
        WEBHOOK_RETRY_SECONDS, "numbers of seconds (0 or more) separated by commas"
    )
    # Log lines: "json" (one object a line) or "text"; json unless in development mode.
    log_format: Literal["json", "text"] = _setting("json", "json or text")
    # The lowest level logged: debug adds each tool's progress lines and the copy's tasks.
    log_level: Literal["debug", "info", "warning", "error"] = _setting(
        "info", "debug, info, warning or error"
    )
    # The bearer token that reads GET /metrics; without one /metrics is open in
    # development mode and refused in production.
    metrics_token: str = _setting("", "a bearer token", secret=True)

    def __init__(self, **values: Any) -> None:
        """Defaults, then `values` (field names); no environment is read here."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(explain(err, values)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the keyword arguments: the environment is read by `from_env`, at the edge.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings `env` (os.environ by default) gives; ConfigError if any is unusable,
        or if a CAPY_* variable is a misspelling of a setting's (it would be ignored)."""
        environ = os.environ if env is None else env
        source = _MappingEnvSource(cls, environ)
        values = {_field_name(key): value for key, value in source().items()}
        misspelt = misspellings(environ)
        try:
            settings = cls(**values)
        except ConfigError as err:
            raise ConfigError("; ".join([*misspelt, str(err)])) from None
        if misspelt:
            raise ConfigError("; ".join(misspelt))
        return settings

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr=False hides a secret field; a URL field is shown, its password masked.
        for name, value in super().__repr_args__():
            info = type(self).model_fields.get(name or "")
            if info is not None and _extra(info, "url") and isinstance(value, str):
                value = redact_conninfo(value)
            yield name, value

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like new settings (unlike `model_copy`, which
        skips validation); ConfigError if a change is out of range."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

    # -- conversions and development-mode defaults -------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """Defaults that depend on other settings: development mode implies the public
        development key, private sources allowed and text logs; the public S3 endpoint
        is the S3 endpoint unless set."""
        if not isinstance(data, dict):
            return data
        data = {_field_name(key): value for key, value in data.items()}
        environment = data.get("environment", PRODUCTION)
        if isinstance(environment, str) and environment.strip().lower() == DEVELOPMENT:
            data.setdefault("secret_key", DEV_SECRET_KEY)
            data.setdefault("allow_private_sources", True)
            data.setdefault("log_format", "text")
        if "s3_endpoint" in data:
            data.setdefault("s3_public_endpoint", data["s3_endpoint"])
        return data

    @field_validator("environment", "log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("extension_allowlist", "clerk_authorized_parties", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise PydanticUseDefault()
            return _split_keys(value)
        return value

    @field_validator("webhook_retry_seconds", mode="before")
    @classmethod
    def _delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise PydanticUseDefault()
            return tuple(item.strip() for item in value.split(","))
        return value

    @field_validator("test_holds")
    @classmethod
    def _holds(cls, value: str) -> str:
        for item in _split_keys(value):
            name, equals, seconds = item.partition("=")
            try:
                ok = bool(name.strip() and equals) and 0 <= float(seconds) <= MAX_SECONDS
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{item!r} is not point=seconds")
        return value

    @field_validator("database_url")
    @classmethod
    def _libpq_parses(cls, value: str) -> str:
        connect_params(value)  # ValueError, with what libpq said, if it cannot
        return value

    @model_validator(mode="after")
    def _combinations(self) -> Settings:
        return self.checked()

    # -- what the rest of the code reads --------------------------------------------------

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

    def checked(self) -> Settings:
        """Refuse combinations the service cannot run with (ConfigError).

        Each setting's own range is checked by its field; these rules involve several.
        """
        if self.stage_time_limit_seconds >= self.broker_consumer_timeout_seconds:
            raise ConfigError(
                f"CAPY_STAGE_TIME_LIMIT_SECONDS ({self.stage_time_limit_seconds}) must be below "
                f"CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS ({self.broker_consumer_timeout_seconds}), RabbitMQ's "
                "consumer_timeout: a stage still running when the broker's timeout passes loses its message. "
                "For big imports raise both together: consumer_timeout in rabbitmq.conf and "
                "CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS, then CAPY_STAGE_TIME_LIMIT_SECONDS below it"
            )
        if self.test_holds and not self.dev_mode:
            raise ConfigError(
                "CAPY_TEST_HOLDS is for fault-injection tests only (development mode); unset it"
            )
        return self


# -- names and messages ---------------------------------------------------------------------


def env_var(name: str) -> str:
    """The environment variable of the field `name` (`CAPY_ENV` for `environment`)."""
    alias = Settings.model_fields[name].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + name.upper()


def env_vars() -> dict[str, str]:
    """Every setting's environment variable, by field name, in declaration order."""
    return {name: env_var(name) for name in Settings.model_fields}


def misspellings(environ: Mapping[str, str]) -> list[str]:
    """A sentence for each CAPY_* variable that is not a setting's but nearly is one
    (CAPY_CONCURENCY): set, it would be ignored and the default used without a word.
    Other CAPY_* variables (CAPY_WORKER_THREADS, compose's passwords) are not settings'."""
    names = list(env_vars().values())
    # A field whose variable has a name of its own, set by its field's name: CAPY_ENVIRONMENT.
    by_field = {
        ENV_PREFIX + field.upper(): name
        for field, name in env_vars().items()
        if name != ENV_PREFIX + field.upper()
    }
    sentences: list[str] = []
    for key in sorted(environ):
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in names:
            close = [by_field[key.upper()]] if key.upper() in by_field else []
            close = close or difflib.get_close_matches(key.upper(), names, n=1, cutoff=0.8)
            if close:
                sentences.append(f"{key} is not a setting: did you mean {close[0]}? Rename it, or unset it")
    return sentences


def _field_name(key: str) -> str:
    """A field's name from its name or its alias (`CAPY_ENV` → `environment`)."""
    if key in Settings.model_fields:
        return key
    for name, info in Settings.model_fields.items():
        if info.validation_alias == key:
            return name
    return key


def _extra(info: FieldInfo, key: str) -> Any:
    extra = info.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short"}
_NUMBER_ERRORS = {"int_parsing", "int_type", "int_from_float", "float_parsing", "float_type"}


def explain(err: ValidationError, values: Mapping[str, Any]) -> str:
    """One sentence per bad variable: its name, its value (secrets hidden, URLs
    redacted) and what is allowed."""
    raw = {_field_name(key): value for key, value in values.items()}
    sentences: list[str] = []
    seen: set[str] = set()
    for error in err.errors():
        context = error.get("ctx") or {}
        if isinstance(context.get("error"), ConfigError):  # a rule of `checked`, already a sentence
            sentences.append(str(context["error"]))
            continue
        name = _field_name(str(error["loc"][0])) if error["loc"] else ""
        if name not in Settings.model_fields:
            sentences.append(f"unknown setting {name!r}" if name else str(error["msg"]))
            continue
        if name in seen:  # one sentence per variable (a list may fail at several items)
            continue
        seen.add(name)
        info = Settings.model_fields[name]
        value = raw.get(name, error.get("input"))
        if _extra(info, "secret"):
            shown = "(the value is hidden)"
        elif isinstance(value, str) and _extra(info, "url"):
            shown = repr(redact_conninfo(value))
        elif error["type"] in _RANGE_ERRORS and _is_number(value):
            shown = str(value).strip()
        else:
            shown = repr(value)
        rule = _extra(info, "rule") or "valid"
        if context.get("le") == MAX_SECONDS or error["type"] == "finite_number":
            rule = f"{rule}, at most {MAX_SECONDS:,} (10 years)"
        if error["type"] in _NUMBER_ERRORS and info.annotation is int:
            rule = rule if rule.startswith("a whole number") else f"a whole number, {rule}"
        why = f" ({context['error']})" if error["type"] == "value_error" and context.get("error") else ""
        sentences.append(f"{env_var(name)} must be {rule}, not {shown}{why}")
    return "; ".join(sentences)


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int | float)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading `environ` instead of os.environ
    (so `from_env` can be given a mapping, as tests and the benchmark do)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {
            (key if self.case_sensitive else key.lower()): value
            for key, value in environ.items()
            if not (self.env_ignore_empty and value == "")
        }
