"""Deleting what a test run or a bench run declared on the shared RabbitMQ."""

from __future__ import annotations

from collections.abc import Iterable

import pika

from pipeline.queue import declared_queues


def delete_queues(broker_url: str, prefixes: Iterable[str]) -> None:
    """Delete every queue an instance with one of `prefixes` may have declared
    (pipeline.queue.declared_queues); deleting one that does not exist is not an error."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        for prefix in prefixes:
            for name in declared_queues(prefix):
                channel.queue_delete(name)
    finally:
        connection.close()
