import pytest

from pipeline.config import DEFAULT_EXTENSION_ALLOWLIST, DEV_SECRET_KEY, ConfigError, Settings
from pipeline.sealing import Sealer


def test_defaults_run_against_local_services():
    settings = Settings.from_env({})
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/capy_imports"
    assert settings.broker_url.startswith("amqp://guest:guest@127.0.0.1:5672")
    assert settings.s3_endpoint == "http://127.0.0.1:8333"
    assert settings.allow_private_sources is False
    assert settings.extension_allowlist == DEFAULT_EXTENSION_ALLOWLIST
    assert settings.environment == "production" and not settings.dev_mode
    assert settings.rate_limit_per_minute == 120
    assert settings.clerk_jwks_url == "" and settings.clerk_authorized_parties == ()


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
    assert settings.maintenance_work_mem == "64MB"
    assert Settings.from_env({"CAPY_MAINTENANCE_WORK_MEM": "1GB"}).maintenance_work_mem == "1GB"
    assert settings.extension_allowlist == ("citext", "hstore")
    assert settings.s3_public_endpoint == "http://minio:9000"
    assert not settings.uses_dev_secret


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAPY_CONCURRENCY": "many"}, "CAPY_CONCURRENCY must be a whole number"),
        ({"CAPY_CONCURRENCY": "0"}, "CAPY_CONCURRENCY must be"),
        ({"CAPY_MAINTENANCE_WORK_MEM": "lots"}, "CAPY_MAINTENANCE_WORK_MEM must be a size such as 256MB"),
        ({"CAPY_MAINTENANCE_WORK_MEM": "256MB; DROP"}, "CAPY_MAINTENANCE_WORK_MEM must be a size"),
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


def test_production_without_a_secret_key_refuses_to_start():
    settings = Settings.from_env({})
    with pytest.raises(ConfigError, match="CAPY_SECRET_KEY is not set") as info:
        settings.secret_keys()
    assert "CAPY_ENV=development" in str(info.value)
    with pytest.raises(ConfigError, match="CAPY_SECRET_KEY is not set"):
        Sealer(settings.secret_key)


def test_production_refuses_the_public_development_key():
    settings = Settings.from_env({"CAPY_SECRET_KEY": DEV_SECRET_KEY})
    with pytest.raises(ConfigError, match="public development key"):
        settings.secret_keys()


def test_development_mode_implies_the_development_defaults():
    settings = Settings.from_env({"CAPY_ENV": "development"})
    assert settings.dev_mode and settings.uses_dev_secret
    assert settings.secret_keys() == (DEV_SECRET_KEY,)
    assert settings.allow_private_sources is True
    assert (
        Settings.from_env(
            {"CAPY_ENV": "development", "CAPY_ALLOW_PRIVATE_SOURCES": "false"}
        ).allow_private_sources
        is False
    )


def test_unknown_environment_names_the_variable():
    with pytest.raises(ConfigError, match="CAPY_ENV must be production or development"):
        Settings.from_env({"CAPY_ENV": "staging"})


def test_several_keys_are_read_current_first():
    new = "n" * 32
    settings = Settings.from_env({"CAPY_SECRET_KEY": f" {new} , old-key ,"})
    assert settings.secret_keys() == (new, "old-key")


def test_production_refuses_a_short_current_key():
    with pytest.raises(ConfigError, match="has 1 characters; production needs at least 32"):
        Settings.from_env({"CAPY_SECRET_KEY": "x"}).secret_keys()
    # A short key may stay behind the current one, to open what it sealed.
    assert Settings.from_env({"CAPY_SECRET_KEY": "k" * 32 + ",old"}).secret_keys() == ("k" * 32, "old")


def test_clerk_and_rate_limit_settings():
    settings = Settings.from_env(
        {
            "CAPY_CLERK_JWKS_URL": "https://clerk.example.com/.well-known/jwks.json",
            "CAPY_CLERK_ISSUER": "https://clerk.example.com",
            "CAPY_CLERK_AUTHORIZED_PARTIES": "https://app.example.com, https://admin.example.com",
            "CAPY_RATE_LIMIT_PER_MINUTE": "30",
        }
    )
    assert settings.clerk_issuer == "https://clerk.example.com"
    assert settings.clerk_authorized_parties == ("https://app.example.com", "https://admin.example.com")
    assert settings.rate_limit_per_minute == 30


def test_source_deadlines():
    defaults = Settings.from_env({})
    assert (defaults.preflight_deadline_seconds, defaults.source_read_timeout_seconds) == (20, 1800)
    settings = Settings.from_env(
        {"CAPY_PREFLIGHT_DEADLINE_SECONDS": "5", "CAPY_SOURCE_READ_TIMEOUT_SECONDS": "60"}
    )
    assert (settings.preflight_deadline_seconds, settings.source_read_timeout_seconds) == (5, 60)
    with pytest.raises(
        ConfigError, match="CAPY_PREFLIGHT_DEADLINE_SECONDS must be a whole number of seconds above 0"
    ):
        Settings.from_env({"CAPY_PREFLIGHT_DEADLINE_SECONDS": "0"})


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


def test_the_stage_time_limit_stays_below_the_brokers_consumer_timeout():
    settings = Settings.from_env({})
    # RabbitMQ's default consumer_timeout is 30 min: a stage is stopped before it.
    assert settings.broker_consumer_timeout_seconds == 1800
    assert settings.stage_time_limit_seconds == 1500
    raised = Settings.from_env(
        {"CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS": "25200", "CAPY_STAGE_TIME_LIMIT_SECONDS": "21600"}
    )
    assert (raised.broker_consumer_timeout_seconds, raised.stage_time_limit_seconds) == (25200, 21600)


@pytest.mark.parametrize(
    "env",
    [
        {"CAPY_STAGE_TIME_LIMIT_SECONDS": "21600"},
        {"CAPY_STAGE_TIME_LIMIT_SECONDS": "1800"},
        {"CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS": "600"},
    ],
)
def test_a_stage_time_limit_not_below_the_consumer_timeout_refuses_to_start(env):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert "CAPY_STAGE_TIME_LIMIT_SECONDS" in message and "CAPY_BROKER_CONSUMER_TIMEOUT_SECONDS" in message
    assert "consumer_timeout" in message and "raise both together" in message


def test_test_holds_are_read_per_point():
    settings = Settings.from_env({"CAPY_ENV": "development", "CAPY_TEST_HOLDS": "restore=30, swap=2.5"})
    assert (
        settings.hold_seconds("restore"),
        settings.hold_seconds("swap"),
        settings.hold_seconds("fetch"),
    ) == (
        30.0,
        2.5,
        0.0,
    )
    assert Settings.from_env({}).hold_seconds("restore") == 0.0
    with pytest.raises(ConfigError, match="CAPY_TEST_HOLDS is for fault-injection tests only"):
        Settings.from_env({"CAPY_TEST_HOLDS": "restore=30"})


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_attempts_below_one_refuses_to_start(value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"CAPY_ENV": "development", "CAPY_MAX_ATTEMPTS": value})
    assert str(info.value) == (
        f"CAPY_MAX_ATTEMPTS must be at least 1 (how many times a stage may be tried; 1 means no retry), not {value}"
    )


def test_max_attempts_below_one_is_refused_however_settings_are_made():
    with pytest.raises(ConfigError, match="CAPY_MAX_ATTEMPTS must be at least 1"):
        Settings.from_env({"CAPY_ENV": "development"}).replace(max_attempts=0).checked()


def test_the_publish_deadline_is_a_few_seconds_and_bounded():
    d = Settings.from_env({})
    assert (d.publish_deadline_seconds, d.broker_blocked_timeout_seconds) == (3, 30)
    s = Settings.from_env({"CAPY_PUBLISH_DEADLINE_SECONDS": "5", "CAPY_BROKER_BLOCKED_TIMEOUT_SECONDS": "10"})
    assert (s.publish_deadline_seconds, s.broker_blocked_timeout_seconds) == (5, 10)
    with pytest.raises(ConfigError, match="CAPY_PUBLISH_DEADLINE_SECONDS .* at most 20"):
        Settings.from_env({"CAPY_PUBLISH_DEADLINE_SECONDS": "25"})
    with pytest.raises(ConfigError, match="CAPY_PUBLISH_DEADLINE_SECONDS"):
        Settings.from_env({"CAPY_PUBLISH_DEADLINE_SECONDS": "0"})
