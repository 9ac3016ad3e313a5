"""Encryption at rest for secrets we must store (source URLs, cluster admin URLs)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

from stages.errors import PermanentError


class Sealer:
    """Fernet (AES-128-CBC + HMAC-SHA256) keyed from CAPY_SECRET_KEY."""

    def __init__(self, secret_key: str) -> None:
        key = base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest())
        self._fernet = Fernet(key)

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as err:
            raise PermanentError(
                "a stored secret cannot be decrypted: CAPY_SECRET_KEY differs from the one it was stored with"
            ) from err
