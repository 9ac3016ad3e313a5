"""One webhook POST: to the checked address, with short timeouts, no redirects followed,
and at most MAX_RESPONSE_BYTES of the answer read.

The connection goes to `Target.address` (the address the gate checked); the URL's host
name is still what the request's `Host` header and TLS (SNI and certificate checks)
use. `http.client` follows no redirects: a 3xx is an answer like any other non-2xx.
A watchdog closes the socket at the overall deadline, so an endpoint that trickles its
answer cannot hold a worker thread longer than that.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pipeline.webhooks.endpoints import Target

CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0
# The whole attempt, connecting included: past it the socket is closed.
DEADLINE_SECONDS = 20.0
MAX_RESPONSE_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Answer:
    """What one attempt got: a status code, or why there was none; how long it took."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300 and self.error is None


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout)
        self._address = target.address
        self._read_timeout = read_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.settimeout(self._read_timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(
        self, target: Target, connect_timeout: float, read_timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout, context=context)
        self._address = target.address
        self._read_timeout = read_timeout
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        raw.settimeout(self._read_timeout)
        # Held before the handshake, so the watchdog can cut a handshake that trickles
        # and close() releases the socket if the handshake fails.
        self.sock = raw
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def post(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    read_timeout: float = READ_TIMEOUT_SECONDS,
    deadline: float = DEADLINE_SECONDS,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """POST `body` to `target`; never raises for anything the endpoint or the network does."""
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = _PinnedHTTPS(target, connect_timeout, read_timeout, tls or ssl.create_default_context())
    else:
        connection = _PinnedHTTP(target, connect_timeout, read_timeout)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(deadline, stop)
    watchdog.daemon = True
    started = time.monotonic()
    watchdog.start()
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        status = response.status
        response.read(max_response_bytes)  # the rest, if any, is left unread
        error = None if 200 <= status < 300 else _status_error(status, response.getheader("Location"))
        return Answer(status, error, _ms(started))
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set():
            return Answer(None, f"no complete answer within {deadline:g} s", _ms(started))
        return Answer(None, _describe(err, target, connect_timeout, read_timeout), _ms(started))
    finally:
        watchdog.cancel()
        connection.close()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _status_error(status: int, location: str | None) -> str:
    if 300 <= status < 400:
        # The endpoint's text, shown in a terminal by `webhooks deliveries`: no control characters.
        location = _CONTROL.sub("?", location[:200]) if location else None
        return f"the endpoint answered {status} (a redirect{' to ' + location if location else ''}); redirects are not followed: register the final URL"
    return f"the endpoint answered {status}"


def _describe(err: BaseException, target: Target, connect_timeout: float, read_timeout: float) -> str:
    where = f"{target.host} ({target.address}:{target.port})"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate of {where} was refused: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return f"TLS with {where} failed ({err.reason or type(err).__name__})"
    if isinstance(err, ConnectionRefusedError):
        return f"{where} refused the connection"
    if isinstance(err, TimeoutError | socket.timeout):
        return f"{where} did not answer in time (connect {connect_timeout:g} s, read {read_timeout:g} s)"
    if isinstance(err, http.client.HTTPException):
        return f"{where} sent an answer that is not valid HTTP ({type(err).__name__})"
    return (
        f"could not reach {where} ({type(err).__name__}: {err.strerror or err})"
        if isinstance(err, OSError)
        else str(err)
    )
