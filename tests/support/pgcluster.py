"""A throw-away Postgres cluster with password (SCRAM) authentication, for tests of
what a source with real credentials does (wrong password, unknown user...).

The machine's own cluster trusts every local connection, so it cannot refuse a
password. initdb refuses to run as root, so the cluster runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TempCluster:
    port: int
    superuser: str
    password: str
    data_dir: str = ""
    bin_dir: str = "/usr/lib/postgresql/15/bin"

    def stop(self) -> None:
        """Stop the server at once (as a crash or a failover would), keeping its data."""
        subprocess.run(
            _as_postgres([f"{self.bin_dir}/pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "stop"]),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        """Start it again on the same port, with the options it was first started with."""
        root = os.path.dirname(self.data_dir)
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}"
        subprocess.run(
            _as_postgres(
                [
                    f"{self.bin_dir}/pg_ctl",
                    "-D",
                    self.data_dir,
                    "-l",
                    os.path.join(root, "log"),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    options,
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def url(self, dbname: str = "postgres", *, user: str | None = None, password: str | None = None) -> str:
        user = user or self.superuser
        password = self.password if password is None else password
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}?sslmode=disable"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@contextlib.contextmanager
def temporary_cluster(
    bin_dir: str = "/usr/lib/postgresql/15/bin", password: str = "capy-source-pw", *, settings: str = ""
) -> Iterator[TempCluster]:
    """Start a cluster on a free loopback port (`settings`: more `-c name=value` server
    options); stop and delete it on exit."""
    root = tempfile.mkdtemp(prefix="capy-pg-")
    os.chmod(root, 0o755)
    data = os.path.join(root, "data")
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w") as fh:
        fh.write(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres(
            [
                f"{bin_dir}/initdb",
                "-D",
                data,
                "-U",
                "capy_admin",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    log = os.path.join(root, "log")
    subprocess.run(
        _as_postgres(
            [
                f"{bin_dir}/pg_ctl",
                "-D",
                data,
                "-l",
                log,
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} {settings}".strip(),
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield TempCluster(
            port=port, superuser="capy_admin", password=password, data_dir=data, bin_dir=bin_dir
        )
    finally:
        subprocess.run(
            _as_postgres([f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]),
            capture_output=True,
        )
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)


LOCALE_SOURCES = "/usr/share/i18n/locales"


@contextlib.contextmanager
def cluster_with_locales(names: Iterable[str]) -> Iterator[TempCluster]:
    """`temporary_cluster` that also knows the locales `names` ("de_DE.UTF-8"…), made by
    localedef from glibc's locale sources into a folder of its own, which only the
    server sees (LOCPATH in its environment): the machine's locales stay as they are."""
    folder = tempfile.mkdtemp(prefix="capy-locales-")
    os.chmod(folder, 0o755)  # the server (user postgres) reads it
    previous = os.environ.get("LOCPATH")
    try:
        for name in names:
            source, _, charmap = name.partition(".")
            assert os.path.exists(os.path.join(LOCALE_SOURCES, source)), (
                f"making the locale {name} needs glibc's locale sources: apt-get install locales"
            )
            # localedef warns (exit 1) on some sources, yet writes the locale
            subprocess.run(
                ["localedef", "-i", source, "-f", charmap or "UTF-8", os.path.join(folder, name)],
                capture_output=True,
            )
            assert os.path.isdir(os.path.join(folder, name)), f"localedef made no {name}"
        with contextlib.ExitStack() as stack:
            os.environ["LOCPATH"] = folder  # for the server the cluster starts, and no one else
            try:
                made = stack.enter_context(temporary_cluster())
            finally:
                _set_env("LOCPATH", previous)
            yield made
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
