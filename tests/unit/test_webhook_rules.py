"""Webhooks without sockets or a database: signatures, the envelope, the backoff, the
address gate, which changes are events, and the queue's messages."""

import hashlib
import hmac
import http.client
import json
import re
import socket

import pytest
from dramatiq.brokers.stub import StubBroker

from pipeline.config import WEBHOOK_RETRY_SECONDS, ConfigError, Settings
from pipeline.errors import InvalidRequest
from pipeline.models import Job
from pipeline.webhooks import signing
from pipeline.webhooks.delivery import MAX_ATTEMPTS, backoff_schedule
from pipeline.webhooks.endpoints import EndpointAddressNotAllowed, check_address, parse_url
from pipeline.webhooks.events import event_types
from pipeline.webhooks.queue import MAX_HOP_SECONDS, WebhookQueue
from stages.connections.addresses import resolve

SECRET = "whsec_test-secret"
BODY = b'{"created_at":"2026-11-29T12:00:00Z","data":{"id":"job_1"},"id":"evt_1","type":"job.completed"}'


# -- signatures -------------------------------------------------------------------------


def test_signature_header_is_t_and_v1_hex_hmac_sha256_of_t_dot_body():
    header = signing.signature_header(SECRET, 1_764_417_600, BODY)
    expected = hmac.new(SECRET.encode(), b"1764417600." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1764417600,v1={expected}"
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)


def test_every_header_of_an_attempt():
    headers = signing.headers(SECRET, 1_764_417_600, BODY, event_type="job.completed", delivery_id="whd_1")
    assert headers["X-CapyDB-Event"] == "job.completed"
    assert headers["X-CapyDB-Delivery"] == "whd_1"
    assert headers["X-CapyDB-Signature"] == signing.signature_header(SECRET, 1_764_417_600, BODY)
    assert headers["Content-Type"] == "application/json"


def test_verify_accepts_the_signature_and_refuses_a_changed_body_key_or_old_time():
    now = 1_764_417_600
    header = signing.signature_header(SECRET, now, BODY)
    assert signing.verify(SECRET, header, BODY, now=now + 10)
    assert not signing.verify(SECRET, header, BODY.replace(b"job_1", b"job_2"), now=now)
    assert not signing.verify("whsec_other", header, BODY, now=now)
    assert not signing.verify(SECRET, header, BODY, now=now + signing.DEFAULT_TOLERANCE_SECONDS + 1)
    assert not signing.verify(SECRET, "v1=" + "0" * 64, BODY, now=now)
    assert not signing.verify(SECRET, "t=abc,v1=00", BODY, now=now)


# What anyone may send a receiver: a verifier answers False, it does not raise (a 500).
HOSTILE_SIGNATURES = ("t={now},v1=é", "t={now},v1=\udcff", "t=²,v1=00", "t=,v1=", ",,=,", "t={now}")


@pytest.mark.parametrize("header", HOSTILE_SIGNATURES)
def test_verify_refuses_a_hostile_header_without_raising(header):
    now = 1_764_417_600
    assert signing.verify(SECRET, header.format(now=now), BODY, now=now) is False


def test_secrets_are_whsec_and_unique():
    first, second = signing.new_secret(), signing.new_secret()
    assert first.startswith("whsec_") and len(first) > 40 and first != second


# -- the envelope -----------------------------------------------------------------------


def test_envelope_has_exactly_id_type_created_at_data():
    body = signing.envelope(
        "evt_1", "import.completed", "2026-11-29T12:00:00Z", {"id": "job_1", "state": "completed"}
    )
    parsed = json.loads(body)
    assert parsed == {
        "id": "evt_1",
        "type": "import.completed",
        "created_at": "2026-11-29T12:00:00Z",
        "data": {"id": "job_1", "state": "completed"},
    }
    assert b" " not in body  # compact: the signed bytes are the bytes sent


def test_envelope_refuses_an_unknown_type():
    with pytest.raises(ValueError, match="job.started"):
        signing.envelope("evt_1", "job.started", "2026-11-29T12:00:00Z", {})


# -- the backoff ------------------------------------------------------------------------


def test_default_backoff_waits_between_eight_attempts():
    backoff = backoff_schedule()
    assert MAX_ATTEMPTS == 8
    waits = [backoff(n) for n in range(1, MAX_ATTEMPTS)]
    assert waits == [5, 30, 120, 600, 1800, 3600, 7200]
    assert waits == sorted(waits)


def test_a_short_schedule_repeats_its_last_wait():
    backoff = backoff_schedule([0, 2])
    assert [backoff(n) for n in range(1, 5)] == [0, 2, 2, 2]
    with pytest.raises(ValueError):
        backoff_schedule([])


def test_the_retry_schedule_is_a_setting():
    assert Settings.from_env({}).webhook_retry_seconds == WEBHOOK_RETRY_SECONDS
    assert Settings.from_env({"CAPY_WEBHOOK_RETRY_SECONDS": "0, 1.5,3"}).webhook_retry_seconds == (0, 1.5, 3)
    for bad in ("soon", "1,-1", ","):
        with pytest.raises(ConfigError, match="CAPY_WEBHOOK_RETRY_SECONDS"):
            Settings.from_env({"CAPY_WEBHOOK_RETRY_SECONDS": bad})


# -- the address gate -------------------------------------------------------------------


def public(host, port):
    return ["93.184.215.14"]


def test_a_public_https_endpoint_is_pinned_to_its_checked_address():
    target = check_address(
        "https://hooks.example.invalid/capy/events?x=1", dev_mode=False, allow_private=False, resolver=public
    )
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https",
        "hooks.example.invalid",
        443,
        "/capy/events?x=1",
        "93.184.215.14",
    )


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("::1", "loopback"),
        ("::ffff:192.168.1.1", "IPv4-mapped"),
    ],
)
def test_non_public_addresses_are_refused_outside_development(address, problem):
    with pytest.raises(EndpointAddressNotAllowed, match=problem) as info:
        check_address(
            "https://hooks.example.invalid/",
            dev_mode=False,
            allow_private=False,
            resolver=lambda h, p: [address],
        )
    assert "CAPY_ALLOW_PRIVATE_SOURCES" in info.value.message


def test_one_private_address_among_public_ones_is_refused():
    with pytest.raises(EndpointAddressNotAllowed, match="one of its addresses"):
        check_address(
            "https://hooks.example.invalid/",
            dev_mode=False,
            allow_private=False,
            resolver=lambda h, p: ["93.184.215.14", "10.0.0.7"],
        )


def test_development_mode_allows_a_loopback_http_receiver():
    target = check_address(
        "http://localhost.invalid:8765/hook",
        dev_mode=True,
        allow_private=True,
        resolver=lambda h, p: ["127.0.0.1"],
    )
    assert (target.scheme, target.port, target.address) == ("http", 8765, "127.0.0.1")


def test_an_unresolvable_host_is_refused():
    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(EndpointAddressNotAllowed, match="does not resolve"):
        check_address(
            "https://nowhere.invalid/",
            dev_mode=False,
            allow_private=False,
            resolver=lambda h, p: resolve(h, p, getaddrinfo=no_such_name),
        )


@pytest.mark.parametrize(
    ("url", "dev_mode", "message"),
    [
        ("http://hooks.example.invalid/", False, "https://"),
        ("ftp://hooks.example.invalid/", True, "https://"),
        ("https://user:pw@hooks.example.invalid/", False, "credentials"),
        ("https://hooks.example.invalid/#top", False, "fragment"),
        ("https:///path", False, "no host"),
        ("https://hooks.example.invalid:99999/", False, "not a valid URL"),
        ("https://hooks.example.invalid/a b", False, "spaces"),
        ("https://hooks.example.invalid/a\x85b", False, "control characters"),
        ("https://hooks.example.invalid/a\u3000b", False, "spaces"),
        ("https://hooks.example.invalid/" + "a" * 3000, False, "characters long"),
    ],
)
def test_malformed_urls_say_what_to_fix(url, dev_mode, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_url(url, dev_mode=dev_mode)


# -- which changes are events -----------------------------------------------------------


def job(state, type_="project.import"):
    return Job(id="job_1", state=state, type=type_)


@pytest.mark.parametrize(
    ("before", "after", "type_", "events"),
    [
        ("running", "completed", "project.import", ["job.completed", "import.completed"]),
        ("running", "completed", "project.export", ["job.completed"]),
        ("running", "failed", "project.import", ["job.failed"]),
        ("pending", "failed", "project.import", ["job.failed"]),
        ("pending", "cancelled", "project.import", ["job.failed"]),
        ("running", "cancelled", "project.import", ["job.failed"]),
        ("pending", "running", "project.import", []),
        ("running", "running", "project.import", []),
        ("running", "pending", "project.import", []),
        # A retry of an ended job, or an update of one, ends nothing.
        ("failed", "pending", "project.import", []),
        ("completed", "completed", "project.import", []),
    ],
)
def test_only_a_job_reaching_its_end_is_an_event(before, after, type_, events):
    assert event_types(job(before, type_), job(after, type_)) == events


# -- the queue --------------------------------------------------------------------------


def test_attempts_go_to_the_webhooks_queue_and_long_waits_travel_in_hops():
    settings = Settings.from_env({}).replace(queue_prefix="capyunit")
    broker = StubBroker()
    queue = WebhookQueue(broker, settings)
    queue.send("whd_1", 1)
    queue.send("whd_1", 2, delay_seconds=7200)
    assert queue.queue_name == "capyunit.webhooks"
    assert broker.queues["capyunit.webhooks"].qsize() == 1
    delayed = json.loads(broker.queues["capyunit.webhooks.DQ"].get_nowait())
    assert delayed["args"] == ["whd_1", 2]
    assert delayed["options"]["eta"] - delayed["message_timestamp"] <= MAX_HOP_SECONDS * 1000 + 1000
    broker.close()


# -- the README's receiver snippet ------------------------------------------------------


def test_the_readme_verification_snippet_accepts_our_signature_and_nothing_else():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    section = readme.split("\n## Webhooks\n", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - our own documentation
    verify = namespace["verify"]
    import time

    now = int(time.time())
    header = signing.signature_header(SECRET, now, BODY)
    assert verify(SECRET, header, BODY)
    assert not verify(SECRET, header, BODY + b" ")
    assert not verify("whsec_other", header, BODY)
    assert not verify(SECRET, signing.signature_header(SECRET, now - 3600, BODY), BODY)
    for hostile in HOSTILE_SIGNATURES:
        assert verify(SECRET, hostile.format(now=now), BODY) is False, hostile


def test_a_path_with_other_than_ascii_is_sent_percent_encoded():
    # http.client writes the request line in ASCII: an endpoint added with `/é` made
    # every attempt raise (nothing recorded) instead of being sent.
    target = check_address(
        "https://hooks.example.invalid/crochet/é?projet=été",
        dev_mode=False,
        allow_private=False,
        resolver=public,
    )
    assert target.path == "/crochet/%C3%A9?projet=%C3%A9t%C3%A9"
    http.client.HTTPConnection(target.host).putrequest("POST", target.path)  # no socket: the line only
