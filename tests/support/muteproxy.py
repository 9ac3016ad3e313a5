"""A loopback source that accepts the login and then never answers.

`MuteAfterLogin` forwards the startup and the login of each connection to a real
trust-auth server (the local PostgreSQL), relays its answers up to the first
ReadyForQuery — so the client is connected, with a real backend pid and parameters —
and from then on reads whatever the client sends and answers nothing. TCP keeps
acknowledging, so keepalives never fire: only an application deadline ends the wait.
Listens on 127.0.0.1 only; closing it closes every socket it opened.
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


@contextlib.contextmanager
def mute_after_login(upstream_port: int = 5432, *, answered: int = 0) -> Iterator[MuteAfterLogin]:
    proxy = MuteAfterLogin(upstream_port, answered=answered)
    try:
        yield proxy
    finally:
        proxy.close()
