"""Which hosting provider a source URL points at, and whether it is a transaction pooler.

Told from the host name, port and user alone (nothing is looked up). A transaction
pooler (PgBouncer or Supavisor in transaction mode) hands each transaction to any
server session, so `pg_dump` cannot share its snapshot between its connections and
session state does not survive; an import needs the provider's direct connection.
"""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN = "unknown"

# (provider, host suffixes); the first match wins, so more specific suffixes go first.
_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("neon", (".neon.tech",)),
    ("supabase", (".supabase.co", ".supabase.com")),
    ("digitalocean", (".db.ondigitalocean.com",)),
    ("aws-rds", (".rds.amazonaws.com",)),
    ("heroku", (".compute-1.amazonaws.com",)),
    ("google-cloudsql", (".sql.goog",)),
    ("azure", (".postgres.database.azure.com",)),
    ("render", (".render.com",)),
    ("railway", (".railway.app", ".rlwy.net", ".railway.internal")),
    ("aiven", (".aivencloud.com",)),
    ("crunchy-bridge", (".postgresbridge.com",)),
    ("timescale", (".tsdb.cloud.timescale.com",)),
)
_SUPABASE_TRANSACTION_PORT = 6543
_DIGITALOCEAN_POOL_PORT = 25061
_DIGITALOCEAN_DIRECT_PORT = 25060


@dataclass(frozen=True)
class Provider:
    """`name` is a provider id (``neon``, ``supabase``, …, ``unknown``); `pooler` says
    why the address is a transaction pooler and what to use instead, or is None."""

    name: str
    pooler: str | None = None


def detect_provider(host: str, port: int, user: str = "") -> Provider:
    """The provider behind `host` (and, for the pooler ports, `port`)."""
    name = _provider_name(host.lower().rstrip("."), user)
    return Provider(name, _pooler(name, host.lower().rstrip("."), port, user))


def _provider_name(host: str, user: str) -> str:
    for name, suffixes in _SUFFIXES:
        if host.endswith(suffixes):
            return name
    # Heroku Postgres outside us-east-1 still lives on EC2 names; its users start with u.
    if host.startswith("ec2-") and host.endswith(".amazonaws.com") and user.startswith("u"):
        return "heroku"
    return UNKNOWN


def _pooler(name: str, host: str, port: int, user: str) -> str | None:
    where = f"{host}:{port}"
    if name == "neon":
        endpoint, _, rest = host.partition(".")
        if endpoint.endswith("-pooler"):
            direct = f"{endpoint.removesuffix('-pooler')}.{rest}"
            return (
                f"{where} is Neon's connection pooler (PgBouncer in transaction mode: the host "
                f"name ends in -pooler); use the direct connection string, host {direct}"
            )
    if name == "supabase" and port == _SUPABASE_TRANSACTION_PORT:
        return (
            f"{where} is Supabase's transaction pooler (port 6543); use the direct "
            f"connection, {_supabase_direct(host, user)}, or the session pooler on port 5432"
        )
    if name == "digitalocean" and port == _DIGITALOCEAN_POOL_PORT:
        return (
            f"{where} is a DigitalOcean connection pool (PgBouncer, port {port}); use the "
            f"direct connection on port {_DIGITALOCEAN_DIRECT_PORT}"
        )
    return None


def _supabase_direct(host: str, user: str) -> str:
    # Direct: db.<ref>.supabase.co:5432. Supavisor's users are "<role>.<ref>".
    if host.startswith("db.") and host.endswith(".supabase.co"):
        return f"{host}:5432"
    _, _, ref = user.partition(".")
    if ref:
        return f"db.{ref}.supabase.co:5432"
    return "db.<project-ref>.supabase.co:5432"
