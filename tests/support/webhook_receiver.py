"""A loopback HTTP server that records webhook requests and answers as told."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """`answers`: status codes to answer in turn (then `default`); `body` is sent with each."""

    url: str
    answers: list[int] = field(default_factory=list)
    default: int = 200
    body: bytes = b"ok"
    location: str | None = None
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 120) -> list[Received]:
        """The requests once there are at least `count` (a wait, not an assertion on time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.1)
        with self.lock:
            raise AssertionError(f"the receiver got {len(self.requests)} requests, not {count}")


@contextmanager
def receiver(**options: object) -> Iterator[Receiver]:
    """A receiver on 127.0.0.1 and a free port, for the block."""
    state = Receiver(url="", **options)  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            with state.lock:
                state.requests.append(Received(self.path, {k: v for k, v in self.headers.items()}, body))
                status = state.answers.pop(0) if state.answers else state.default
            self.send_response(status)
            if state.location:
                self.send_header("Location", state.location)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/capy?source=test"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
