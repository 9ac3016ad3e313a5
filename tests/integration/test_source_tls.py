"""A tenant's source gets nothing of ours: no client certificate, no password.

A throw-away cluster on 127.0.0.1 serves TLS with a self-signed certificate and asks
clients for a certificate (ssl_ca_file set). The service's HOME holds a client
certificate in ~/.postgresql, as an operator's machine might: libpq offers it to any
server by default. A tenant's connection (psycopg2's libpq, and the PostgreSQL 15 tools'
libpq) must not offer it; an admin URL (ours) still may.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import psycopg2
import pytest

from stages.connections.connect import connect
from stages.connections.pgurl import SourceURL
from tests.support.pgcluster import TempCluster, temporary_cluster

PSQL = "/usr/lib/postgresql/15/bin/psql"
WHO = "SELECT ssl, coalesce(client_dn, '-') FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def _self_signed(folder: str, name: str, cn: str) -> tuple[str, str]:
    cert, key = os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o600)
    return cert, key


@pytest.fixture(scope="module")
def tls_home(tmp_path_factory) -> Iterator[tuple[TempCluster, str]]:
    """A TLS cluster, and a HOME whose ~/.postgresql holds a client certificate it trusts."""
    home = str(tmp_path_factory.mktemp("home"))
    dotpg = os.path.join(home, ".postgresql")
    os.makedirs(dotpg)
    client_cert, client_key = _self_signed(dotpg, "postgresql", "capy-service-host")
    server_dir = tempfile.mkdtemp(prefix="capy-tls-")  # the server (user postgres) must reach it
    os.chmod(server_dir, 0o755)
    server_cert, server_key = _self_signed(server_dir, "server", "db.invalid")
    ca = os.path.join(server_dir, "clients.crt")
    shutil.copy(client_cert, ca)
    if os.geteuid() == 0:
        for path in (server_dir, server_cert, server_key, ca):
            shutil.chown(path, "postgres", "postgres")
    with temporary_cluster() as cluster:
        admin = psycopg2.connect(cluster.url())
        admin.autocommit = True
        with admin.cursor() as cur:
            for setting, value in (
                ("ssl_cert_file", server_cert),
                ("ssl_key_file", server_key),
                ("ssl_ca_file", ca),
            ):
                cur.execute(f"ALTER SYSTEM SET {setting} = %s", (value,))
            cur.execute("ALTER SYSTEM SET ssl = on")
            cur.execute("SELECT pg_reload_conf()")
        admin.close()
        try:
            yield cluster, home
        finally:
            shutil.rmtree(server_dir, ignore_errors=True)


def _url(cluster: TempCluster, query: str) -> str:
    return cluster.url().replace("?sslmode=disable", f"?{query}")


def _who(url: SourceURL) -> tuple[bool, str]:
    conn = connect(url, timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(WHO)
            return cur.fetchone()
    finally:
        conn.close()


def _psql_who(url: SourceURL, home: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": home, **url.env()}
    return subprocess.run(
        [PSQL, "--no-psqlrc", "--no-password", "-At", "-F", "|", f"--dbname={url.conninfo()}", "-c", WHO],
        env=env,
        capture_output=True,
        text=True,
    )


def test_a_tenant_connection_uses_tls_and_offers_no_client_certificate(tls_home, monkeypatch):
    cluster, home = tls_home
    monkeypatch.setenv("HOME", home)
    ours = SourceURL.parse(_url(cluster, "sslmode=require"))
    assert _who(ours) == (True, "/CN=capy-service-host")  # libpq's default: ~/.postgresql/postgresql.crt
    tenant = SourceURL.parse_source(_url(cluster, "sslmode=require"))
    assert _who(tenant) == (True, "-")
    tool = _psql_who(tenant, home)
    assert (tool.returncode, tool.stdout.strip()) == (0, "t|-"), tool.stderr


def test_verify_full_checks_against_the_system_authorities(tls_home, monkeypatch):
    cluster, home = tls_home
    monkeypatch.setenv("HOME", home)
    for query in ("sslmode=verify-full", "sslrootcert=system"):
        tenant = SourceURL.parse_source(_url(cluster, query))
        with pytest.raises(Exception) as info:
            _who(tenant)
        assert "certificate verify failed" in str(info.value)
        tool = _psql_who(tenant, home)
        assert tool.returncode != 0 and "certificate verify failed" in tool.stderr
        assert ".postgresql" not in tool.stderr


def test_our_pgpassword_is_never_sent_to_a_tenant_without_a_password(password_source, monkeypatch):
    """The worker's environment may hold a PGPASSWORD (the operator's). libpq falls back
    to it when a URL has none: fine for our URLs, never for a tenant's."""
    monkeypatch.setenv("PGPASSWORD", password_source.password)
    bare = password_source.url("chinook").replace(f":{password_source.password}@", "@")
    assert _who(SourceURL.parse(bare))[0] is False  # ours: the inherited password logs in
    with pytest.raises(Exception, match="refused the login") as info:
        _who(SourceURL.parse_source(bare))
    assert "no password supplied" in str(info.value.__cause__)  # ours was not sent
    tenant = SourceURL.parse_source(bare)
    env = {**os.environ, **tenant.env()}  # what the tools' runner does today: os.environ, then ours
    tool = subprocess.run(
        [PSQL, "--no-psqlrc", "--no-password", "-At", f"--dbname={tenant.conninfo()}", "-c", "SELECT 1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert tool.returncode != 0 and "no password supplied" in tool.stderr
