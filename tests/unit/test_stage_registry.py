"""The stage registry is the one list of stages: the enum, the order, the queues, the
result models and the jobs table's constraint all follow it."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
from dramatiq.brokers.stub import StubBroker

from pipeline import jobs
from pipeline.config import Settings
from pipeline.migrations import MIGRATIONS
from pipeline.models import STAGE_ORDER, Stage
from pipeline.queue import StageQueue
from pipeline.steps.registry import STAGE_NAMES, STAGES, spec_of
from pipeline.steps.results import JobFacts, StageResult


@pytest.mark.parametrize("spec", STAGES, ids=lambda spec: spec.name)
def test_each_stage_runs_in_its_own_module_and_returns_its_result_model(spec):
    run = spec.run
    assert run.__module__ == spec.module == f"pipeline.steps.{spec.name}"
    assert list(inspect.signature(run).parameters) == ["steps", "context"]
    assert inspect.signature(run).return_annotation == spec.result.__name__
    assert issubclass(spec.result, StageResult)
    assert spec_of(spec.name) is spec


@pytest.mark.parametrize("spec", STAGES, ids=lambda spec: spec.name)
def test_what_a_stage_returns_later_stages_read_from_the_job(spec):
    for name, field in spec.result.model_fields.items():
        assert name in JobFacts.model_fields, name
        assert JobFacts.model_fields[name].annotation == field.annotation, name


def test_the_stage_enum_and_the_order_follow_the_registry():
    assert [stage.value for stage in STAGE_ORDER] == list(STAGE_NAMES) == [spec.name for spec in STAGES]
    assert [Stage(name) for name in STAGE_NAMES] == list(Stage)
    assert (Stage.PREFLIGHT, Stage.FETCH, Stage.RESTORE, Stage.FINALIZE) == tuple(Stage)
    assert [jobs.next_stage(name) for name in STAGE_NAMES] == [*STAGE_NAMES[1:], None]
    with pytest.raises(KeyError, match="no stage is called 'upload'"):
        spec_of("upload")


def test_every_stage_has_its_queue():
    settings = Settings.from_env({}).replace(queue_prefix="capyunit")
    broker = StubBroker()
    try:
        queue = StageQueue(broker, settings)
        assert list(queue.actors) == list(STAGE_NAMES)
        assert queue.queue_names() == [f"capyunit.{name}" for name in STAGE_NAMES] + ["capyunit.exhausted"]
    finally:
        broker.close()


def test_the_jobs_table_accepts_exactly_the_registrys_stages():
    """A stage added to the registry needs a migration of the jobs table's CHECK
    constraint: this says so before the first job reaches it."""
    schema = "\n".join(sql for _name, sql in MIGRATIONS)
    constraints = re.findall(r"\bstage IN \(([^)]*)\)", schema)
    assert constraints, "no CHECK constraint on jobs.stage found in the migrations"
    assert re.findall(r"'([a-z_]+)'", constraints[-1]) == list(STAGE_NAMES)


def test_a_worker_loads_every_stage_before_its_first_job():
    """A fresh interpreter, as a worker process starts: no stage module is loaded until
    load_stages (pipeline.services.worker calls it), then all are."""
    probe = (
        "import sys\n"
        "from pipeline.steps.registry import STAGES, load_stages\n"
        "before = [s.module for s in STAGES if s.module in sys.modules]\n"
        "load_stages()\n"
        "print(before, all(s.module in sys.modules for s in STAGES))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[] True", done.stderr


def test_the_declared_queues_name_every_queue_an_instance_declares():
    """What the test suites and the bench delete when they are done (tests/support/broker.py):
    every queue the stages, the exhausted jobs and the webhook deliveries declare, with
    dramatiq's delay and dead-letter queues. The bench once left each run's webhook
    queues behind on the shared RabbitMQ."""
    from pipeline.queue import declared_queues
    from pipeline.webhooks.queue import WebhookQueue

    settings = Settings.from_env({}).replace(queue_prefix="capyunit")
    broker = StubBroker()
    try:
        StageQueue(broker, settings)
        WebhookQueue(broker, settings)
        declared = set(broker.get_declared_queues()) | set(broker.get_declared_delay_queues())
    finally:
        broker.close()
    assert "capyunit.webhooks" in declared
    named = set(declared_queues("capyunit"))
    assert declared <= named, declared - named
    assert {name + variant for name in declared for variant in ("", ".DQ", ".XQ")} >= named
