"""A loopback TCP proxy that can stop passing bytes, as a network that drops packets.

`HoldProxy(upstream_port)` forwards every connection to 127.0.0.1:upstream_port. While
held, it reads nothing and forwards nothing in either direction (connections stay
open, so neither side sees an error: only its own timeouts notice); `release()` lets
the bytes through again. Listens on 127.0.0.1 only; closing it closes every socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from tests.support.pgproxy import _Listener


class HoldProxy(_Listener):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = threading.Event()
        self.flowing.set()
        super().__init__()

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    def serve(self, client: socket.socket) -> None:
        upstream = self.track(socket.create_connection(("127.0.0.1", self.upstream_port)))
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def hold_proxy(upstream_port: int) -> Iterator[HoldProxy]:
    proxy = HoldProxy(upstream_port)
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.close()
