"""Encryption at rest for secrets we must store (source URLs, cluster admin URLs, role
passwords), with key rotation.

CAPY_SECRET_KEY holds one key or several separated by commas: the first seals, every
one opens (cryptography's MultiFernet). To rotate, put the new key first, keep the old
one after it, run `capy-imports secrets rotate`, then drop the old key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pipeline.config import ConfigError
from stages.errors import PermanentError


def _fernet_key(secret: str) -> bytes:
    return base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest())


def _digest_key(secret: str) -> bytes:
    # A key of its own for digests, so a digest never reveals anything about the
    # encryption key it was derived beside.
    return hashlib.sha256(b"capy-imports request digest\0" + secret.encode()).digest()


class Sealer:
    """Fernet (AES-128-CBC + HMAC-SHA256) keyed from CAPY_SECRET_KEY; the first key seals."""

    def __init__(self, secret_key: str | Sequence[str]) -> None:
        raw = secret_key.split(",") if isinstance(secret_key, str) else list(secret_key)
        keys = [key.strip() for key in raw if key.strip()]
        if not keys:
            raise ConfigError(
                "CAPY_SECRET_KEY is not set: set it to a long random string (it encrypts the "
                "secrets the service stores), or set CAPY_ENV=development for local development"
            )
        self._current = Fernet(_fernet_key(keys[0]))
        self._fernet = MultiFernet([Fernet(_fernet_key(key)) for key in keys])
        self._digest_keys = [_digest_key(key) for key in keys]

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as err:
            raise PermanentError(
                "a stored secret cannot be decrypted: none of the keys in CAPY_SECRET_KEY is "
                "the one it was stored with"
            ) from err

    def is_current(self, token: str) -> bool:
        """True if `token` is sealed with the current (first) key."""
        try:
            self._current.decrypt(token.encode())
        except InvalidToken:
            return False
        return True

    def reseal(self, token: str) -> str:
        """`token` sealed again with the current key; PermanentError if no key opens it."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as err:
            raise PermanentError(
                "a stored secret cannot be decrypted with any key in CAPY_SECRET_KEY"
            ) from err

    def digest(self, text: str) -> str:
        """A keyed digest of `text` (HMAC-SHA256 under the current key): safe to store even
        when `text` holds a password."""
        return hmac.new(self._digest_keys[0], text.encode(), hashlib.sha256).hexdigest()

    def digest_matches(self, text: str, digest: str) -> bool:
        """True if `digest` is `digest(text)` under any of the keys (so rotation keeps it)."""
        return any(
            hmac.compare_digest(hmac.new(key, text.encode(), hashlib.sha256).hexdigest(), digest)
            for key in self._digest_keys
        )
