"""The project's side of a preflight, read from its cluster without changing anything."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

from stages.connections.connect import server_major
from stages.connections.rows import one_row
from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.preflight.report import Target

T = TypeVar("T")


def describe_target(
    admin: ClusterAdmin,
    database_name: str,
    *,
    owner: RoleLogin,
    recreate: bool,
    storage_limit_bytes: int,
    allowlist: Iterable[str],
) -> Target:
    """The `Target` for an import into `database_name` on `admin`'s cluster.

    Reads the server version now (one read-only transaction); whether the database is
    empty and which extensions the cluster can install are read on first use, once.
    The database is read as `owner`, its owning (project) role, never as the admin:
    it holds whatever a tenant put there.
    """
    with admin.connection() as conn:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version')")
            version = str(one_row(cur)[0])
        major = server_major(conn)
        conn.rollback()
    return Target(
        major=major,
        version=version,
        storage_limit_bytes=storage_limit_bytes,
        recreate=recreate,
        is_empty=_once(lambda: admin.is_empty(database_name, owner)),
        allowlist=tuple(allowlist),
        available_extensions=_once(lambda: available_extensions(admin)),
    )


def available_extensions(admin: ClusterAdmin) -> dict[str, str]:
    """name -> default_version of every extension the cluster can install.

    `pg_available_extensions` lists the control files on the server's disk, so it is
    the same from every database of the cluster.
    """
    with admin.connection() as conn:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            cur.execute("SELECT name, default_version FROM pg_available_extensions ORDER BY name")
            rows = cur.fetchall()
        conn.rollback()
    return {str(name): str(version) for name, version in rows}


def _once(read: Callable[[], T]) -> Callable[[], T]:
    return functools.cache(read)
