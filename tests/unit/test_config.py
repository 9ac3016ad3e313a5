import pytest

from pipeline.config import DEFAULT_EXTENSION_ALLOWLIST, ConfigError, Settings


def test_defaults_run_against_local_services():
    settings = Settings.from_env({})
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/capy_imports"
    assert settings.broker_url.startswith("amqp://guest:guest@127.0.0.1:5672")
    assert settings.s3_endpoint == "http://127.0.0.1:8333"
    assert settings.allow_private_sources is False
    assert settings.extension_allowlist == DEFAULT_EXTENSION_ALLOWLIST
    assert settings.uses_dev_secret


def test_values_are_converted_where_read():
    settings = Settings.from_env(
        {
            "CAPY_ALLOW_PRIVATE_SOURCES": "true",
            "CAPY_CONCURRENCY": "8",
            "CAPY_EXTENSION_ALLOWLIST": "citext, hstore,",
            "CAPY_S3_ENDPOINT": "http://minio:9000",
            "CAPY_SECRET_KEY": "x" * 40,
        }
    )
    assert settings.allow_private_sources is True
    assert settings.concurrency == 8
    assert settings.extension_allowlist == ("citext", "hstore")
    assert settings.s3_public_endpoint == "http://minio:9000"
    assert not settings.uses_dev_secret


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAPY_CONCURRENCY": "many"}, "CAPY_CONCURRENCY must be a whole number"),
        ({"CAPY_ALLOW_PRIVATE_SOURCES": "maybe"}, "CAPY_ALLOW_PRIVATE_SOURCES must be true or false"),
    ],
)
def test_bad_values_say_which_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_secrets_are_not_in_repr():
    settings = Settings.from_env({"CAPY_SECRET_KEY": "topsecretvalue", "CAPY_S3_SECRET_KEY": "s3secretvalue"})
    assert "topsecretvalue" not in repr(settings)
    assert "s3secretvalue" not in repr(settings)


def test_deadlines_and_fair_share_settings():
    defaults = Settings.from_env({})
    assert (defaults.command_timeout_seconds, defaults.command_stall_seconds) == (3 * 3600, 600)
    assert (defaults.preflight_command_timeout_seconds, defaults.job_time_limit_seconds) == (15, 4 * 3600)
    assert (defaults.org_max_active_jobs, defaults.org_wait_retry_seconds) == (2, 30)
    settings = Settings.from_env(
        {
            "CAPY_COMMAND_TIMEOUT_SECONDS": "60",
            "CAPY_COMMAND_STALL_SECONDS": "30",
            "CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS": "5",
            "CAPY_JOB_TIME_LIMIT_SECONDS": "120",
            "CAPY_ORG_MAX_ACTIVE_JOBS": "1",
            "CAPY_ORG_WAIT_RETRY_SECONDS": "10",
        }
    )
    assert (settings.command_timeout_seconds, settings.command_stall_seconds) == (60, 30)
    assert (settings.preflight_command_timeout_seconds, settings.job_time_limit_seconds) == (5, 120)
    assert (settings.org_max_active_jobs, settings.org_wait_retry_seconds) == (1, 10)
    with pytest.raises(ConfigError, match="CAPY_ORG_MAX_ACTIVE_JOBS must be at least 1, not 0"):
        Settings.from_env({"CAPY_ORG_MAX_ACTIVE_JOBS": "0"})
