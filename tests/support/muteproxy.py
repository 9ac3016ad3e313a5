"""Loopback sources that stop answering: after the login, or in the middle of a result.

`MuteAfterLogin` forwards the startup and the login of each connection to a real
trust-auth server (the local PostgreSQL), relays its answers up to the first
ReadyForQuery — so the client is connected, with a real backend pid and parameters —
and from then on reads whatever the client sends and answers nothing. TCP keeps
acknowledging, so keepalives never fire: only an application deadline ends the wait.

`CutOffRelay` passes bytes both ways untouched, and stops passing the server's bytes to
the client once a connection has received `after_bytes` of them: a source that stalls
in the middle of a large table's COPY (its backend blocks on a full socket, cancel
requests still reach it). Smaller sessions (logins, catalog reads) never notice it.

Each listens on 127.0.0.1 only; closing it closes every socket it opened.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

from tests.support.pgproxy import ToyPooler, _Listener, _message, _read_message


class MuteAfterLogin(_Listener):
    """With `answered`, the first that many queries of each connection still get the
    server's answer (simple query protocol, as psycopg2 and pg_dump speak it)."""

    def __init__(self, upstream_port: int, *, answered: int = 0) -> None:
        self.upstream_port = upstream_port
        self.answered = answered
        self.logged_in = threading.Event()
        self.held = threading.Event()  # a message after login (and the answered ones) went unanswered
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        startup = ToyPooler._startup(client)  # refuses SSL and GSS encryption
        server = self.track(socket.create_connection(("127.0.0.1", self.upstream_port)))
        server.sendall(startup)
        self._relay_until_ready(server, client, login=True)
        self.logged_in.set()
        for _ in range(self.answered):
            kind, body = _read_message(client)
            if kind == b"X":
                return
            server.sendall(_message(kind, body))
            self._relay_until_ready(server, client, login=False)
        while client.recv(4096):
            self.held.set()

    @staticmethod
    def _relay_until_ready(server: socket.socket, client: socket.socket, *, login: bool) -> None:
        while True:
            kind, body = _read_message(server)
            if login and kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise ConnectionError("the mute proxy only supports trust authentication")
            client.sendall(_message(kind, body))
            if kind == b"Z":
                return


class CutOffRelay(_Listener):
    """Relays every connection to 127.0.0.1:`upstream_port`; a connection's server side
    stops being read (and so relayed) after `after_bytes`. `cut` is set when one is."""

    def __init__(self, upstream_port: int, *, after_bytes: int) -> None:
        self.upstream_port = upstream_port
        self.after_bytes = after_bytes
        self.cut = threading.Event()
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        server = self.track(socket.create_connection(("127.0.0.1", self.upstream_port)))
        back = threading.Thread(target=self._server_to_client, args=(server, client), daemon=True)
        back.start()
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        relayed = 0
        with contextlib.suppress(OSError):
            while relayed < self.after_bytes:
                data = server.recv(min(65536, self.after_bytes - relayed))
                if not data:
                    client.shutdown(socket.SHUT_WR)
                    return
                client.sendall(data)
                relayed += len(data)
            self.cut.set()  # from now on the server's bytes stay in its socket


@contextlib.contextmanager
def cut_off_relay(upstream_port: int = 5432, *, after_bytes: int) -> Iterator[CutOffRelay]:
    relay = CutOffRelay(upstream_port, after_bytes=after_bytes)
    try:
        yield relay
    finally:
        relay.close()


@contextlib.contextmanager
def mute_after_login(upstream_port: int = 5432, *, answered: int = 0) -> Iterator[MuteAfterLogin]:
    proxy = MuteAfterLogin(upstream_port, answered=answered)
    try:
        yield proxy
    finally:
        proxy.close()
