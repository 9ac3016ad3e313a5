"""Wake-ups on the stage queues, with Dramatiq's in-memory broker (no sockets)."""

from dramatiq.brokers.stub import StubBroker

from pipeline.config import Settings
from pipeline.queue import StageQueue


def test_wake_can_be_delayed_for_a_job_that_must_wait():
    settings = Settings.from_env({}).replace(queue_prefix="capyunit")
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


def test_the_web_publishers_broker_waits_for_nothing_unbounded():
    import dramatiq

    from pipeline.queue import make_broker

    before = dramatiq.get_broker()
    try:
        web = make_broker(Settings(broker_blocked_timeout_seconds=12), publisher=True)
        assert (web.parameters.blocked_connection_timeout, web.parameters.socket_timeout) == (12, 3)
        assert web.parameters.connection_attempts == 1
        url = "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=2&blocked_connection_timeout=7"
        own = make_broker(Settings(broker_url=url), publisher=True)
        assert (own.parameters.heartbeat, own.parameters.blocked_connection_timeout) == (2, 7)
        worker = make_broker(Settings())
        assert worker.parameters.blocked_connection_timeout is None  # consumers are never recycled
    finally:
        dramatiq.set_broker(before)


def test_a_control_database_outage_is_retried_beyond_the_jobs_attempts():
    from pipeline.db import ControlDatabaseUnavailable
    from pipeline.queue import CONTROL_DATABASE_RETRIES, _retried
    from stages.errors import PermanentError, TransientError

    assert _retried(1, TransientError("source timed out"), 3)
    assert not _retried(2, TransientError("source timed out"), 3)
    assert not _retried(0, PermanentError("bad dump"), 3)
    assert not _retried(0, RuntimeError("bug"), 3)
    assert _retried(2, ControlDatabaseUnavailable("down"), 3)
    assert _retried(CONTROL_DATABASE_RETRIES - 1, ControlDatabaseUnavailable("down"), 3)
    assert not _retried(CONTROL_DATABASE_RETRIES, ControlDatabaseUnavailable("down"), 3)


def test_a_stage_that_failed_transiently_waits_the_configured_backoff_doubling_to_five_minutes():
    from pipeline.queue import MAX_BACKOFF_MS

    broker = StubBroker()
    for seconds in (5, 1, 42):
        settings = Settings.from_env({"CAPY_RETRY_BACKOFF_SECONDS": str(seconds)}).replace(
            queue_prefix=f"capyunit{seconds}"
        )
        queue = StageQueue(broker, settings)
        for actor in queue.actors.values():
            assert actor.options["min_backoff"] == seconds * 1000
            assert actor.options["max_backoff"] == MAX_BACKOFF_MS == 300_000
    assert Settings.from_env({}).retry_backoff_seconds == 5
    broker.close()
