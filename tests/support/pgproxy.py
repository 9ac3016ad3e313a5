"""Loopback stand-ins for what sits between us and a source: a pooler and a black hole.

`ToyPooler` speaks just enough of the Postgres wire protocol (simple queries, trust
authentication, no TLS) to behave as PgBouncer does where preflight looks: it announces
a backend pid of its own at login, may refuse the `options` startup parameter, and with
two server sessions hands each transaction to the next one (transaction pooling).
`SilentListener` accepts connections and never answers, like a firewalled port that
completes the handshake. Both listen on 127.0.0.1 only and stop when closed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    kind = _read_exact(sock, 1)
    (length,) = struct.unpack("!i", _read_exact(sock, 4))
    return kind, _read_exact(sock, length - 4)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


class _Listener:
    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.open.append(client)
            threading.Thread(target=self._serve_safely, args=(client,), daemon=True).start()

    def _serve_safely(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError, struct.error):
            self.serve(client)

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def track(self, sock: socket.socket) -> socket.socket:
        with self.lock:
            self.open.append(sock)
        return sock

    def close(self) -> None:
        # Closing a listening socket does not wake a thread blocked in its accept() on
        # Linux (the join then waited out its 5 s, in every test that used a proxy);
        # shutting it down first does: accept() fails with EINVAL.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(timeout=5)
        with self.lock:
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class SilentListener(_Listener):
    """Accepts, then says nothing until closed."""

    def serve(self, client: socket.socket) -> None:
        while client.recv(4096):
            pass


class ToyPooler(_Listener):
    """A toy PgBouncer in front of a trust-auth server at 127.0.0.1:`upstream_port`."""

    def __init__(
        self, upstream_port: int, *, backends: int = 1, fake_pid: int = 424242, reject_options: bool = False
    ) -> None:
        self.upstream_port = upstream_port
        self.backends = backends
        self.fake_pid = fake_pid
        self.reject_options = reject_options
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        startup = self._startup(client)
        params = startup[8:].split(b"\0")
        if self.reject_options and b"options" in params[0::2]:
            error = b"SFATAL\0VFATAL\0C08P01\0Munsupported startup parameter: options\0\0"
            client.sendall(_message(b"E", error))
            return
        servers = [
            self.track(socket.create_connection(("127.0.0.1", self.upstream_port)))
            for _ in range(self.backends)
        ]
        for number, server in enumerate(servers):
            server.sendall(startup)
            self._relay_until_ready(server, client if number == 0 else None, login=True)
        current = 0
        while True:
            kind, body = _read_message(client)
            if kind == b"X":
                return
            servers[current].sendall(_message(kind, body))
            status = self._relay_until_ready(servers[current], client, login=False)
            if status == b"I":  # the transaction is over: the next one may go elsewhere
                current = (current + 1) % len(servers)

    @staticmethod
    def _startup(client: socket.socket) -> bytes:
        while True:
            (length,) = struct.unpack("!i", _read_exact(client, 4))
            body = _read_exact(client, length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                client.sendall(b"N")
                continue
            return struct.pack("!i", length) + body

    def _relay_until_ready(
        self, server: socket.socket, client: socket.socket | None, *, login: bool
    ) -> bytes:
        """Forward the server's messages up to ReadyForQuery; return its status byte."""
        while True:
            kind, body = _read_message(server)
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise ConnectionError("the toy pooler only supports trust authentication")
            if kind == b"K" and login:
                # A pooler announces a pid and cancel key of its own (PgBouncer does).
                body = struct.pack("!i", self.fake_pid) + body[4:]
            if client is not None:
                client.sendall(_message(kind, body))
            if kind == b"Z":
                return body[:1]


@contextlib.contextmanager
def toy_pooler(upstream_port: int, **options: object) -> Iterator[ToyPooler]:
    pooler = ToyPooler(upstream_port, **options)  # type: ignore[arg-type]
    try:
        yield pooler
    finally:
        pooler.close()


@contextlib.contextmanager
def silent_listener() -> Iterator[SilentListener]:
    listener = SilentListener()
    try:
        yield listener
    finally:
        listener.close()
