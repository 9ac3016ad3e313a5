"""compose.yaml: valid by the Compose Specification's JSON schema, and our own rules for
a stack that runs an import (pinned images, health checks, start order, two workers
with volumes of their own, the clock, a grace period longer than a stage's hand-back).

No Docker engine is needed: the file is read as Compose reads it (tests/support/composefile.py).
"""

from __future__ import annotations

import copy
import re

import pytest

from pipeline.config import DEV_SECRET_KEY, Settings
from tests.support.composefile import (
    InterpolationError,
    command_words,
    duration_seconds,
    environment,
    interpolate,
    load,
    raw,
    schema_errors,
)

# The services of ours (built from the Dockerfile) and the ones from public images.
APP_SERVICES = ("release", "seed", "web", "worker-1", "worker-2", "clock")
HEALTH_CHECKED = ("postgres", "rabbitmq", "minio", "web")
LONG_RUNNING = ("web", "worker-1", "worker-2", "clock")


@pytest.fixture(scope="module")
def compose():
    return load()


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def workers(services):
    return {name: s for name, s in services.items() if "dramatiq" in command_words(s)}


def test_the_file_conforms_to_the_compose_specification(compose):
    assert schema_errors(compose) == []


def test_the_schema_check_finds_what_compose_would_refuse(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["web"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["worker-1"]["stop_grace_period"] = 45
    broken["services"]["clock"]["depends_on"]["release"]["condition"] = "service_finished"
    errors = schema_errors(broken)
    assert any(e.startswith("services/web/healthcheck:") and "intervall" in e for e in errors), errors
    assert any(e.startswith("services/worker-1/stop_grace_period:") for e in errors), errors
    assert any(e.startswith("services/clock/depends_on") for e in errors), errors


def test_interpolation_reads_defaults_overrides_escapes_and_required_variables():
    env = {"SET": "value", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET $$HOME", env)
        == "value d d  value $HOME"
    )
    assert interpolate({"k": ["${UNSET:+x}${SET:+x}"]}, env) == {"k": ["x"]}
    with pytest.raises(InterpolationError, match="UNSET"):
        interpolate("${UNSET:?set it}", env)


def test_durations_read_as_compose_reads_them():
    assert duration_seconds("45s") == 45
    assert duration_seconds("1m30s") == 90
    assert duration_seconds("1500ms") == 1.5
    with pytest.raises(ValueError):
        duration_seconds("45")


def test_every_image_is_pinned_to_an_exact_version(services):
    for name, service in services.items():
        if "build" in service:
            continue  # ours: the Dockerfile's base is pinned (test_deploy_files)
        image = service["image"]
        reference, _, digest = image.partition("@")
        repository, _, tag = reference.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image} has no version tag"
        # An exact release: a full version (15.17, 3.13.7) or a dated release, not a major line.
        assert re.match(r"(\d+\.\d+|RELEASE\.\d{4}-\d\d-\d\d)", tag), f"{name}: {tag} is not an exact version"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: bad digest {digest}"


def test_our_services_run_the_image_built_here(services):
    for name in APP_SERVICES:
        assert services[name]["build"] == ".", name
    assert len({services[name]["image"] for name in APP_SERVICES}) == 1


def test_the_backing_services_and_web_have_health_checks(services):
    for name in HEALTH_CHECKED:
        check = services[name].get("healthcheck") or {}
        assert not check.get("disable"), name
        test = check.get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
        assert duration_seconds(check["interval"]) > 0 and int(check["retries"]) > 0, name


def test_start_order_waits_for_health_and_for_the_one_shot_steps(services):
    for name, service in services.items():
        for needed, rule in (service.get("depends_on") or {}).items():
            condition = rule["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), f"{name} -> {needed}"
            if condition == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits for {needed}'s health; it has none"
            else:  # a one-shot step: it must not be restarted
                assert services[needed].get("restart", "no") == "no", f"{needed} is not a one-shot step"
    assert services["release"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in LONG_RUNNING:
        needs = services[name]["depends_on"]
        assert needs["release"]["condition"] == "service_completed_successfully", name
        assert needs["bucket"]["condition"] == "service_completed_successfully", name
        assert needs["rabbitmq"]["condition"] == "service_healthy", name
        assert needs["minio"]["condition"] == "service_healthy", name
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["init"] is True, name


def test_the_release_step_migrates_and_the_dev_profile_seeds(services):
    assert command_words(services["release"]) == ["capy-imports", "migrate"]
    assert "profiles" not in services["release"]
    seed = services["seed"]
    assert seed["profiles"] == ["dev"]
    words = command_words(seed)
    assert words[:3] == ["capy-imports", "--json", "dev-seed"]
    # The project cluster is the compose Postgres, with the password the server was given.
    cluster_url = words[words.index("--cluster-url") + 1]
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert cluster_url == f"postgresql://postgres:{password}@postgres:5432/postgres"
    assert seed["depends_on"] == {"release": {"condition": "service_completed_successfully"}}
    # Only the seed is optional: a plain `docker compose up` runs everything else.
    assert [name for name, s in services.items() if s.get("profiles")] == ["seed"]


def test_the_bucket_step_creates_the_bucket_the_service_uses(services):
    bucket = services["bucket"]
    assert bucket["image"] == services["minio"]["image"]
    assert bucket["entrypoint"] == ["mc"]
    assert bucket["command"] == [
        "mb",
        "--ignore-existing",
        f"local/{environment(services['web'])['CAPY_S3_BUCKET']}",
    ]
    password = services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    user = services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert bucket["environment"]["MC_HOST_local"] == f"http://{user}:{password}@minio:9000"
    env = environment(services["web"])
    assert (env["CAPY_S3_ACCESS_KEY"], env["CAPY_S3_SECRET_KEY"]) == (user, password)


def test_two_workers_each_with_a_work_volume_of_its_own(compose, services):
    found = workers(services)
    assert sorted(found) == ["worker-1", "worker-2"]
    work_volumes = []
    for name, service in found.items():
        work_dir = environment(service)["CAPY_WORK_DIR"]
        mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
        assert work_dir in mounts, f"{name} has no volume at CAPY_WORK_DIR ({work_dir})"
        assert mounts[work_dir] in compose["volumes"], f"{name}: {mounts[work_dir]} is not a named volume"
        work_volumes.append(mounts[work_dir])
    assert len(set(work_volumes)) == 2, work_volumes
    # No other service mounts a worker's work volume.
    for name, service in services.items():
        if name not in found:
            sources = {v.split(":")[0] for v in service.get("volumes", [])}
            assert not sources & set(work_volumes), name
    # Distinct host names: each worker's metric files get a folder of their own.
    assert len({s["hostname"] for s in found.values()}) == 2


def test_workers_and_web_share_the_metrics_volume(services):
    assert environment(services["web"])["PROMETHEUS_MULTIPROC_DIR"] == "/metrics"
    assert "metrics:/metrics" in services["web"]["volumes"]
    for name, service in workers(services).items():
        assert "metrics:/metrics" in service["volumes"], name
        assert "PROMETHEUS_MULTIPROC_DIR=/metrics/worker-$HOSTNAME" in command_words(service), name


def test_the_stop_grace_period_outlasts_the_workers_shutdown_timeout(services):
    for name, service in workers(services).items():
        words = command_words(service)
        shutdown_seconds = int(words[words.index("--worker-shutdown-timeout") + 1]) / 1000
        grace = duration_seconds(service["stop_grace_period"])
        assert grace >= shutdown_seconds + 10, f"{name}: {grace}s grace for a {shutdown_seconds}s shutdown"


def test_a_clock_runs_sweep(services):
    clocks = [name for name, s in services.items() if command_words(s)[:2] == ["capy-imports", "clock"]]
    assert clocks == ["clock"]
    words = command_words(services["clock"])
    assert float(words[words.index("--every") + 1]) > 0


def test_our_services_start_in_production_mode_with_the_local_defaults(services):
    for name in APP_SERVICES:
        env = environment(services[name])
        assert env["CAPY_ENV"] == "production", name
        settings = Settings.from_env(env)  # raises on what the worker would refuse
        keys = settings.secret_keys()  # raises without a usable production key
        assert DEV_SECRET_KEY not in keys and settings.metrics_token, name
        assert not settings.allow_private_sources, name


def test_secrets_come_from_the_environment_and_their_defaults_say_local_only():
    text_defaults = re.findall(r"\$\{(CAPY_\w*(?:KEY|PASSWORD|TOKEN)):-([^}]*)\}", str(raw()))
    assert {name for name, _ in text_defaults} == {
        "CAPY_SECRET_KEY",
        "CAPY_METRICS_TOKEN",
        "CAPY_POSTGRES_PASSWORD",
        "CAPY_RABBITMQ_PASSWORD",
        "CAPY_S3_SECRET_KEY",
    }
    for name, default in text_defaults:
        assert default.startswith("local-only-"), (
            f"{name}'s default {default!r} does not say it is for local use"
        )
    chosen = {
        "CAPY_SECRET_KEY": "k" * 64,
        "CAPY_METRICS_TOKEN": "metrics-token-of-ours",
        "CAPY_POSTGRES_PASSWORD": "pg0123",
        "CAPY_RABBITMQ_PASSWORD": "mq0123",
        "CAPY_S3_SECRET_KEY": "s3secret0123",
    }
    services = load(chosen)["services"]
    for name in APP_SERVICES:
        env = environment(services[name])
        assert env["CAPY_SECRET_KEY"] == "k" * 64 and env["CAPY_METRICS_TOKEN"] == "metrics-token-of-ours", (
            name
        )
        assert (
            "pg0123@postgres" in env["CAPY_DATABASE_URL"] and "mq0123@rabbitmq" in env["CAPY_BROKER_URL"]
        ), name
        assert env["CAPY_S3_SECRET_KEY"] == "s3secret0123", name
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg0123"
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "s3secret0123"
    assert "default_pass = mq0123\n" in load(chosen)["configs"]["rabbitmq-conf"]["content"]
    assert "local-only" not in str(load(chosen))


def test_rabbitmq_consumer_timeout_agrees_with_the_services_setting(compose, services):
    content = compose["configs"]["rabbitmq-conf"]["content"]
    configured_ms = int(re.search(r"^consumer_timeout = (\d+)$", content, re.M).group(1))
    for name in APP_SERVICES:
        assert (
            Settings.from_env(environment(services[name])).broker_consumer_timeout_seconds * 1000
            == configured_ms
        )
    assert (
        "default_user = capy" in content and "amqp://capy:" in environment(services["web"])["CAPY_BROKER_URL"]
    )


def test_only_the_api_and_the_upload_endpoint_are_published_on_loopback(services):
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {"web": ["127.0.0.1:8000:8000"], "minio": ["127.0.0.1:9000:9000"]}
    assert environment(services["web"])["CAPY_S3_PUBLIC_ENDPOINT"] == "http://127.0.0.1:9000"
