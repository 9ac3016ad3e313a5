"""One webhook POST over real loopback sockets: TLS to a pinned address, and the deadline."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.webhooks.endpoints import Target, check_address
from pipeline.webhooks.transport import post

HOST = "hooks.example.invalid"


def self_signed(tmp_path) -> tuple[str, str, bytes]:
    """(cert file, key file, cert PEM) for HOST."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file), pem


@contextmanager
def tls_receiver(tmp_path) -> Iterator[tuple[int, bytes, list[dict[str, str]]]]:
    cert_file, key_file, pem = self_signed(tmp_path)
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({**dict(self.headers.items()), ":path": self.path})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], pem, seen
    finally:
        server.shutdown()
        server.server_close()


def test_https_goes_to_the_pinned_address_and_checks_the_certificate_for_the_host_name(tmp_path):
    with tls_receiver(tmp_path) as (port, pem, seen):
        target = Target("https", HOST, port, "/hook", "127.0.0.1")
        trusted = ssl.create_default_context(cadata=pem.decode())
        answer = post(target, b"{}", {"Content-Type": "application/json"}, tls=trusted)
        assert (answer.status_code, answer.error, answer.ok) == (204, None, True)
        assert seen[0]["Host"] == f"{HOST}:{port}"
        # The default trust store does not know this certificate: refused, and said so.
        refused = post(target, b"{}", {})
        assert refused.status_code is None and not refused.ok
        assert refused.error.startswith(f"TLS certificate of {HOST} (127.0.0.1:{port}) was refused")
    assert len(seen) == 1


def test_an_endpoint_whose_path_is_not_ascii_is_sent_its_path_percent_encoded(tmp_path):
    # http.client writes the request line in ASCII: post() raised UnicodeEncodeError for
    # such an endpoint, so no attempt was ever recorded.
    with tls_receiver(tmp_path) as (port, pem, seen):
        target = check_address(
            f"https://{HOST}:{port}/crochet/é?projet=été",
            dev_mode=False,
            allow_private=True,
            resolver=lambda host, port: ["127.0.0.1"],
        )
        answer = post(target, b"{}", {}, tls=ssl.create_default_context(cadata=pem.decode()))
        assert (answer.status_code, answer.error) == (204, None)
    assert seen[0][":path"] == "/crochet/%C3%A9?projet=%C3%A9t%C3%A9"


def test_an_endpoint_that_never_answers_is_cut_at_the_deadline():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        answer = post(
            Target("http", "127.0.0.1", port, "/", "127.0.0.1"), b"{}", {}, read_timeout=30, deadline=0.5
        )
        assert answer.status_code is None and answer.error == "no complete answer within 0.5 s"
    finally:
        thread.join()
        for sock in accepted:
            sock.close()
        listener.close()


def test_a_closed_port_is_a_refused_connection():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    answer = post(Target("http", "127.0.0.1", port, "/", "127.0.0.1"), b"{}", {})
    assert (
        answer.status_code is None and answer.error == f"127.0.0.1 (127.0.0.1:{port}) refused the connection"
    )
