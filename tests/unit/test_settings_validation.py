"""Settings are validated at start-up: each variable's range, one readable message for
every bad variable (secrets hidden, URL passwords masked), and the same checks for
settings made in code (`Settings(...)`, `settings.replace(...)`)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, Settings, env_var, env_vars


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CAPY_LEASE_SECONDS", "0", "CAPY_LEASE_SECONDS must be a whole number of seconds above 0, not 0"),
        (
            "CAPY_RETRY_BACKOFF_SECONDS",
            "0",
            "CAPY_RETRY_BACKOFF_SECONDS must be a whole number of seconds from 1 to 150, not 0",
        ),
        (
            "CAPY_RETRY_BACKOFF_SECONDS",
            "151",
            "CAPY_RETRY_BACKOFF_SECONDS must be a whole number of seconds from 1 to 150, not 151",
        ),
        (
            "CAPY_SOURCE_CONNECT_TIMEOUT",
            "-5",
            "CAPY_SOURCE_CONNECT_TIMEOUT must be a whole number of seconds above 0, not -5",
        ),
        (
            "CAPY_UPLOAD_RETENTION_SECONDS",
            "-1",
            "CAPY_UPLOAD_RETENTION_SECONDS must be a whole number of seconds, 0 or more, not -1",
        ),
        (
            "CAPY_RATE_LIMIT_PER_MINUTE",
            "-1",
            "CAPY_RATE_LIMIT_PER_MINUTE must be a whole number, 0 or more (0: no limit), not -1",
        ),
        ("CAPY_MAX_BODY_BYTES", "0", "CAPY_MAX_BODY_BYTES must be a whole number of bytes above 0, not 0"),
        (
            "CAPY_MAX_ACTIVE_UPLOADS_PER_PROJECT",
            "0",
            "CAPY_MAX_ACTIVE_UPLOADS_PER_PROJECT must be at least 1, not 0",
        ),
        (
            "CAPY_UPLOAD_URL_EXPIRY_SECONDS",
            "604801",
            "CAPY_UPLOAD_URL_EXPIRY_SECONDS must be a whole number of seconds from 1 to 604800 "
            "(7 days, the most S3 presigns for), not 604801",
        ),
        (
            "CAPY_LEASE_SECONDS",
            "1.5",
            "CAPY_LEASE_SECONDS must be a whole number of seconds above 0, not '1.5'",
        ),
        (
            "CAPY_CLUSTER_RESTORE_LIMIT",
            "four",
            "CAPY_CLUSTER_RESTORE_LIMIT must be a whole number, at least 1, not 'four'",
        ),
        ("CAPY_QUEUE_PREFIX", "   ", "CAPY_QUEUE_PREFIX must be a name for the queues, not '   '"),
    ],
)
def test_a_value_out_of_range_names_the_variable_the_value_and_what_is_allowed(variable, value, message):
    assert refusal({variable: value}) == message


def test_the_edges_of_a_range_are_allowed():
    settings = Settings.from_env(
        {
            "CAPY_UPLOAD_URL_EXPIRY_SECONDS": "604800",
            "CAPY_UPLOAD_RETENTION_SECONDS": "0",
            "CAPY_RATE_LIMIT_PER_MINUTE": "0",
            "CAPY_PUBLISH_DEADLINE_SECONDS": "20",
            "CAPY_LEASE_SECONDS": "1",
        }
    )
    assert (settings.upload_url_expiry_seconds, settings.upload_retention_seconds) == (604800, 0)
    assert (settings.rate_limit_per_minute, settings.publish_deadline_seconds, settings.lease_seconds) == (
        0,
        20,
        1,
    )


def test_every_bad_variable_is_named_at_once():
    message = refusal({"CAPY_CONCURRENCY": "0", "CAPY_LOG_FORMAT": "yaml", "CAPY_ENV": "staging"})
    assert message == (
        "CAPY_CONCURRENCY must be a whole number above 0, not 0; "
        "CAPY_ENV must be production or development, not 'staging'; "
        "CAPY_LOG_FORMAT must be json or text, not 'yaml'"
    )


def test_secrets_never_appear_in_a_refusal():
    message = refusal(
        {"CAPY_S3_SECRET_KEY": " ", "CAPY_DATABASE_URL": "postgresql://capy:hunter2-pw@db/x?nonsense=1"}
    )
    assert "hunter2-pw" not in message
    assert "CAPY_S3_SECRET_KEY must be an S3 secret key, not (the value is hidden)" in message
    assert "CAPY_DATABASE_URL must be a postgresql:// URL or a libpq connection string" in message
    assert "'postgresql://capy:***@db/x?nonsense=1'" in message and '"nonsense"' in message


def test_an_unparsable_key_value_database_url_hides_its_password():
    message = refusal({"CAPY_DATABASE_URL": "host=db password=hunter2-pw dbname"})
    assert message.startswith("CAPY_DATABASE_URL must be") and "hunter2-pw" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://capy:hunter2%zz@db.invalid/x",  # libpq quotes the bad token: the password
        "postgresql://db.invalid/x?pass%77ord=hunter2&nonsense=1",  # libpq decodes the name
        "postgresql://capy:hunter2 pw@db.invalid/x?nonsense=1",  # a space in the password
        "postgresql://capy:hunter2@pw@db.invalid/x?nonsense=1",  # an unencoded '@'
    ],
)
def test_no_form_of_an_unparsable_database_url_shows_its_password(url):
    message = refusal({"CAPY_DATABASE_URL": url})
    assert message.startswith("CAPY_DATABASE_URL must be") and "hunter2" not in message
    assert "pw" not in message.replace("postgresql://", "")


DURATIONS = [
    name
    for name in env_vars().values()
    if name.endswith("_SECONDS")
    # Bounded far lower, each by a range of its own (tested above or in their own tests).
    and name
    not in ("CAPY_UPLOAD_URL_EXPIRY_SECONDS", "CAPY_PUBLISH_DEADLINE_SECONDS", "CAPY_RETRY_BACKOFF_SECONDS")
]


@pytest.mark.parametrize("variable", DURATIONS)
def test_a_duration_too_long_to_add_to_a_date_is_refused_at_start_up(variable):
    # 10**15 s of a job's time limit or a lease passed the start-up check, then every
    # stage raised OverflowError adding it to a datetime (and a webhook attempt did so
    # after sending, before recording).
    message = refusal({variable: "1" + "0" * 15})
    assert message.startswith(f"{variable} must be "), message
    assert message.endswith(", at most 315,360,000 (10 years), not 1000000000000000"), message


@pytest.mark.parametrize("delays", ["inf", "5,1e300", "nan"])
def test_webhook_waits_must_be_finite(delays):
    message = refusal({"CAPY_WEBHOOK_RETRY_SECONDS": delays})
    assert message.startswith("CAPY_WEBHOOK_RETRY_SECONDS must be numbers of seconds"), message


def test_the_longest_duration_allowed_can_be_added_to_a_date():
    import datetime as dt

    from pipeline.config import MAX_SECONDS

    settings = Settings.from_env({"CAPY_WEBHOOK_RETRY_SECONDS": str(MAX_SECONDS)})
    assert settings.webhook_retry_seconds == (MAX_SECONDS,)
    assert dt.datetime.now(dt.UTC) + 2 * dt.timedelta(seconds=MAX_SECONDS) > dt.datetime.now(dt.UTC)


def test_a_misspelt_variable_is_refused_instead_of_ignored():
    # CAPY_STAGE_TIME_LIMIT_SECOND=21600 ran every stage with the 25 min default.
    assert refusal({"CAPY_STAGE_TIME_LIMIT_SECOND": "21600", "CAPY_CONCURRENCY": "0"}) == (
        "CAPY_STAGE_TIME_LIMIT_SECOND is not a setting: did you mean CAPY_STAGE_TIME_LIMIT_SECONDS? "
        "Rename it, or unset it; CAPY_CONCURRENCY must be a whole number above 0, not 0"
    )
    assert "did you mean CAPY_METRICS_TOKEN?" in refusal({"CAPY_METRIC_TOKEN": "s3cret"})
    # The variables named otherwise than their field, set by the field's name.
    assert "did you mean CAPY_ENV?" in refusal({"CAPY_ENVIRONMENT": "development"})
    assert "did you mean CAPY_PG_BIN_DIR?" in refusal({"CAPY_PG_BIN_DIR_TEMPLATE": "/opt/pg/{major}/bin"})
    # Variables of the run commands and of compose.yaml are not settings, nor near one.
    Settings.from_env({"CAPY_WORKER_THREADS": "8", "CAPY_POSTGRES_PASSWORD": "x", "CAPY_IMAGE_TAG": "v1"})


def test_an_empty_variable_means_the_default():
    assert Settings.from_env({"CAPY_CONCURRENCY": "", "CAPY_ENV": "", "CAPY_PG_BIN_DIR": ""}) == Settings()


def test_names_of_their_own_are_read():
    settings = Settings.from_env({"CAPY_ENV": " Development ", "CAPY_PG_BIN_DIR": "/opt/pg/{major}/bin"})
    assert settings.environment == "development" and settings.pg_bin_dir_template == "/opt/pg/{major}/bin"
    assert env_var("environment") == "CAPY_ENV" and env_var("pg_bin_dir_template") == "CAPY_PG_BIN_DIR"
    assert env_vars()["concurrency"] == "CAPY_CONCURRENCY"


def test_building_settings_in_code_reads_no_environment(monkeypatch):
    monkeypatch.setenv("CAPY_CONCURRENCY", "9")
    monkeypatch.setenv("CAPY_ENV", "development")
    assert Settings().concurrency == 2 and Settings().environment == "production"
    assert Settings.from_env().concurrency == 9 and Settings.from_env().dev_mode


def test_settings_made_in_code_are_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"^CAPY_CONCURRENCY must be a whole number above 0, not 0$"):
        Settings(concurrency=0)
    with pytest.raises(ConfigError, match="CAPY_STAGE_TIME_LIMIT_SECONDS \\(1800\\) must be below"):
        Settings().replace(stage_time_limit_seconds=1800)
    with pytest.raises(ConfigError, match="unknown setting 'concurrancy'"):
        Settings(concurrancy=3)


def test_replace_keeps_the_other_values_and_the_original():
    dev = Settings.from_env({"CAPY_ENV": "development", "CAPY_CONCURRENCY": "4"})
    changed = dev.replace(queue_prefix="other")
    assert (changed.queue_prefix, changed.concurrency, changed.secret_key) == ("other", 4, dev.secret_key)
    assert dev.queue_prefix == "capy"
    # Development defaults are not re-derived from an explicit value.
    assert dev.replace(environment="production", secret_key="").secret_key == ""


def test_settings_are_immutable():
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.concurrency = 5  # type: ignore[misc]


def test_the_repr_hides_every_secret():
    settings = Settings.from_env(
        {
            "CAPY_SECRET_KEY": "k" * 40,
            "CAPY_S3_SECRET_KEY": "s3-secret-value",
            "CAPY_METRICS_TOKEN": "metrics-token-value",
        }
    )
    shown = repr(settings) + str(settings)
    assert "k" * 40 not in shown and "s3-secret-value" not in shown and "metrics-token-value" not in shown
    assert "queue_prefix='capy'" in shown


def test_the_repr_masks_the_passwords_of_the_urls():
    # The README promised URLs "with their password masked"; the repr showed both.
    settings = Settings.from_env(
        {
            "CAPY_DATABASE_URL": "postgresql://capy:hunter2-db@db.invalid/capy_imports",
            "CAPY_BROKER_URL": "amqp://capy:hunter2-mq@mq.invalid:5672/%2F",
        }
    )
    shown = repr(settings) + str(settings)
    assert "hunter2" not in shown
    assert "database_url='postgresql://capy:***@db.invalid/capy_imports'" in shown
    assert "broker_url='amqp://capy:***@mq.invalid:5672/%2F'" in shown
    assert settings.database_url.endswith("hunter2-db@db.invalid/capy_imports")  # the value itself is kept


def test_test_holds_are_checked_at_start_up():
    message = refusal({"CAPY_ENV": "development", "CAPY_TEST_HOLDS": "restore=30, swap=soon"})
    assert message == (
        "CAPY_TEST_HOLDS must be point=seconds pairs separated by commas, not 'restore=30, swap=soon' "
        "('swap=soon' is not point=seconds)"
    )
    assert (
        Settings.from_env(
            {"CAPY_ENV": "development", "CAPY_TEST_HOLDS": "restore=30, swap=2.5"}
        ).hold_seconds("swap")
        == 2.5
    )
