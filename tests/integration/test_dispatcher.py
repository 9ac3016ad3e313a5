"""The web's Dispatcher against real RabbitMQ: the machine's node (publishing to queues of
this test's own), and a port where nothing listens (a broker that is down)."""

from __future__ import annotations

import secrets
import time

import pika
import pytest

from pipeline.dispatcher import BrokerUnavailable, DispatchDelayed, Dispatcher
from pipeline.queue import StageQueue, make_broker
from tests.support.pgcluster import free_port


def _dispatcher(settings, deadline=2):
    broker = make_broker(settings, publisher=True)
    return Dispatcher(broker, StageQueue(broker, settings).actors, deadline=deadline), broker


def test_a_broker_that_is_down_is_answered_within_the_deadline(control_db):
    settings = control_db.replace(broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    dispatcher, broker = _dispatcher(settings)
    try:
        started = time.monotonic()
        with pytest.raises(DispatchDelayed, match="could not be reached"):
            dispatcher.wake("job_nobody", "preflight")
        with pytest.raises(BrokerUnavailable, match="could not be reached"):
            dispatcher.check()
        assert time.monotonic() - started < 4
    finally:
        broker.close()


def test_wake_ups_are_published_with_a_confirm_and_the_check_is_a_round_trip(control_db):
    prefix = f"{control_db.queue_prefix}_dispatch_{secrets.token_hex(2)}"
    settings = control_db.replace(queue_prefix=prefix)
    dispatcher, broker = _dispatcher(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        dispatcher.check()
        dispatcher.wake("job_one", "preflight")
        dispatcher.wake("job_two", "fetch")
        channel = connection.channel()
        assert channel.queue_declare(f"{prefix}.preflight", passive=True).method.message_count == 1
        assert channel.queue_declare(f"{prefix}.fetch", passive=True).method.message_count == 1
        _, _, body = channel.basic_get(f"{prefix}.preflight", auto_ack=True)
        assert b'"job_one"' in body
    finally:
        channel = connection.channel()
        for stage in ("preflight", "fetch"):
            for suffix in ("", ".DQ", ".XQ"):
                channel.queue_delete(f"{prefix}.{stage}{suffix}")
        connection.close()
        broker.close()
