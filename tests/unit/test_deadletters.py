"""Reading dead-lettered Dramatiq messages: job, stage, failure and age. No sockets."""

from __future__ import annotations

import datetime as dt
import json

import pika

from pipeline.deadletters import _decode

NOW = dt.datetime(2026, 11, 29, 9, 0, tzinfo=dt.UTC)


def message(**options) -> bytes:
    return json.dumps(
        {
            "queue_name": "capy.restore",
            "actor_name": "capy_restore",
            "args": ["job_abc"],
            "kwargs": {},
            "options": options,
            "message_id": "m-1",
            "message_timestamp": int((NOW - dt.timedelta(hours=2)).timestamp() * 1000),
        }
    ).encode()


def test_a_message_that_went_through_its_retries():
    died = NOW - dt.timedelta(minutes=5)
    properties = pika.BasicProperties(
        headers={"x-death": [{"reason": "rejected", "queue": "capy.restore", "time": died}]}
    )
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nstages.errors.TransientError: internal error in restore\n'
    letter = _decode("capy.restore.XQ", "restore", 7, properties, message(retries=2, traceback=traceback))
    assert (letter.job_id, letter.stage, letter.retries, letter.delivery_tag) == ("job_abc", "restore", 2, 7)
    assert letter.failure == "stages.errors.TransientError: internal error in restore"
    assert letter.summary(NOW)["age_seconds"] == 300
    assert letter.summary(NOW)["dead_since"] == "2026-11-29T08:55:00Z"


def test_a_message_rejected_without_a_retry_says_so():
    properties = pika.BasicProperties(headers={"x-death": [{"reason": "rejected", "time": NOW}]})
    letter = _decode("capy.fetch.XQ", "fetch", 1, properties, message())
    assert letter.failure == "rejected without a recorded error (no retry was attempted)"
    assert letter.retries is None


def test_without_headers_the_age_comes_from_the_message():
    letter = _decode("capy.fetch.XQ", "fetch", 1, pika.BasicProperties(), message())
    assert letter.age_seconds(NOW) == 7200 and letter.failure == "no failure was recorded"


def test_a_body_that_is_not_a_dramatiq_message():
    letter = _decode("capy.fetch.XQ", "fetch", 1, None, b"\xff not json")
    assert letter.job_id is None
    assert letter.failure == "the message is not a Dramatiq message (undecodable)"
