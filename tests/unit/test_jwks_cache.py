"""The Clerk JWKS cache: refresh on an unknown kid or when stale, never faster than the
minimum interval, and keep the last keys when the endpoint fails."""

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from app.clerk import JwksCache
from pipeline.errors import Unauthorized, Unavailable


def _jwk(kid):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


class FakeJwks:
    def __init__(self, *kids):
        self.keys = [_jwk(kid) for kid in kids]
        self.calls = []
        self.down = False

    def __call__(self, url, timeout):
        self.calls.append((url, timeout))
        if self.down:
            raise OSError("connection refused")
        return {"keys": self.keys}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_unknown_kids_refresh_at_most_once_per_interval():
    fetch, clock = FakeJwks("k1"), Clock()
    cache = JwksCache("https://clerk.test/jwks", fetch=fetch, clock=clock, min_refresh_seconds=30, timeout=3)
    assert cache.key_for("k1") is not None
    for _ in range(50):
        with pytest.raises(Unauthorized, match="not one of Clerk's current keys"):
            cache.key_for("bogus")
    assert fetch.calls == [("https://clerk.test/jwks", 3)]
    clock.now += 30
    fetch.keys.append(_jwk("k2"))
    assert cache.key_for("k2") is not None and len(fetch.calls) == 2


def test_stale_keys_are_refreshed_and_kept_when_the_endpoint_fails():
    fetch, clock = FakeJwks("k1"), Clock()
    cache = JwksCache("https://clerk.test/jwks", fetch=fetch, clock=clock, max_age_seconds=3600)
    cache.key_for("k1")
    clock.now += 3600
    fetch.down = True
    assert cache.key_for("k1") is not None  # the last good keys still verify
    assert len(fetch.calls) == 2


def test_no_keys_at_all_is_unavailable():
    fetch = FakeJwks("k1")
    fetch.down = True
    with pytest.raises(Unavailable, match="JWKS is unreachable"):
        JwksCache("https://clerk.test/jwks", fetch=fetch, clock=Clock()).key_for("k1")
