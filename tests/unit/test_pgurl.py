import socket

import pytest

from stages.errors import PermanentError
from stages.pgurl import (
    InvalidSourceURL,
    SourceAddressNotAllowed,
    SourceURL,
    address_problem,
    pin_address,
    redact,
    resolve,
)


def test_parse_keeps_password_apart_and_adds_sslmode():
    url = SourceURL.parse("postgres://alice:s%40cret@db.example.com:6432/shop")
    assert url.password == "s@cret"
    assert url.params == {
        "user": "alice",
        "host": "db.example.com",
        "port": "6432",
        "dbname": "shop",
        "sslmode": "require",
    }
    assert "s@cret" not in url.conninfo()
    assert url.env() == {"PGPASSWORD": "s@cret"}
    assert url.redacted() == "postgresql://alice:***@db.example.com:6432/shop?sslmode=require"


def test_parse_respects_explicit_sslmode_and_default_port():
    url = SourceURL.parse("postgresql://bob@db.example.com/app?sslmode=verify-full")
    assert url.params["sslmode"] == "verify-full"
    assert url.port == 5432


def test_url_round_trips_with_special_characters():
    url = SourceURL.parse("postgres://u:p%2Fa%3Fss%20w@h.example.com/d")
    again = SourceURL.parse(url.url())
    assert again.password == "p/a?ss w"
    assert again.params == url.params


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("mysql://u:p@h/db", "must start with postgres:// or postgresql://"),
        ("", "non-empty string"),
        (42, "non-empty string"),
        ("postgres://u:p@/db", "must name a host"),
        ("postgres://:p@h.example.com/db", "must name a user"),
        ("postgres://u:p@h.example.com", "must name a database"),
        ("postgres://u@h1.example.com,h2.example.com/db", "exactly one host"),
        ("postgres://u:p@h.example.com:99999/db", "invalid port"),
        ("postgres://u:p@[::1/db", "could not be parsed"),
    ],
)
def test_parse_rejects_with_actionable_messages(raw, fragment):
    with pytest.raises(InvalidSourceURL) as info:
        SourceURL.parse(raw)
    assert fragment in info.value.message
    assert ":p@" not in info.value.message


def test_redact_masks_url_and_keyword_passwords_and_named_secrets():
    text = "failed: postgres://u:hunter2@h/db and password=hunter2 and 'hunter2'"
    out = redact(text, "hunter2")
    assert "hunter2" not in out
    assert "postgres://u:***@h/db" in out


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private or reserved address"),
        ("192.168.0.10", "a private or reserved address"),
        ("172.16.5.4", "a private or reserved address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.10.10", "a link-local address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("0.0.0.0", "a private or reserved address"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_problem(address, problem):
    assert address_problem(address) == problem


def test_pin_address_uses_the_first_checked_address():
    url = SourceURL.parse("postgres://u@db.example.com/d")
    pinned = pin_address(url, allow_private=False, resolver=lambda host, port: ["93.184.216.34", "10.0.0.1"])
    assert pinned.params["hostaddr"] == "93.184.216.34"
    assert pinned.host == "db.example.com"


def test_pin_address_refuses_private_unless_allowed():
    url = SourceURL.parse("postgres://u@internal.example.com/d")
    with pytest.raises(SourceAddressNotAllowed) as info:
        pin_address(url, allow_private=False, resolver=lambda host, port: ["10.0.0.7"])
    assert "resolves to 10.0.0.7, a private or reserved address" in info.value.message
    assert "CAPY_ALLOW_PRIVATE_SOURCES" in info.value.message
    assert (
        pin_address(url, allow_private=True, resolver=lambda h, p: ["10.0.0.7"]).params["hostaddr"]
        == "10.0.0.7"
    )


def test_pin_address_unresolvable_host():
    def no_such_name(host, port, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    url = SourceURL.parse("postgres://u@nowhere.invalid/d")
    with pytest.raises(PermanentError) as info:
        pin_address(url, allow_private=False, resolver=lambda h, p: resolve(h, p, getaddrinfo=no_such_name))
    assert info.value.message == "the source host 'nowhere.invalid' does not resolve (Name or service not known); check the host name"
