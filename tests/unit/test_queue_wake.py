"""Wake-ups on the stage queues, with Dramatiq's in-memory broker (no sockets)."""

import dataclasses

from dramatiq.brokers.stub import StubBroker

from pipeline.config import Settings
from pipeline.queue import StageQueue


def test_wake_can_be_delayed_for_a_job_that_must_wait():
    settings = dataclasses.replace(Settings.from_env({}), queue_prefix="capyunit")
    broker = StubBroker()
    queue = StageQueue(broker, settings)
    queue.wake("job_1", "fetch")
    queue.wake("job_2", "fetch", delay_ms=30_000)
    now = broker.queues["capyunit.fetch"]
    later = broker.queues["capyunit.fetch.DQ"]
    assert now.qsize() == 1 and later.qsize() == 1
    delayed = later.get_nowait()
    assert b'"job_2"' in delayed and b'"eta"' in delayed
    broker.close()
