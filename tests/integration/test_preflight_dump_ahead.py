"""The live preflight's schema dump runs beside its reading of the source.

The rehearsal's `pg_dump --schema-only` starts once the source's address is pinned,
while the source's catalog is read and the other checks run (stages.preflight.live
`_schema_dumped_ahead`); a preflight that ends without rehearsing stops it and leaves
no folder behind.
"""

from __future__ import annotations

import glob
import os
import time

import pytest

from pipeline.preflights import preflight_source
from pipeline.sealing import Sealer
from stages.connections.pgurl import SourceURL
from stages.preflight import live as preflight_live
from stages.preflight.registry import SCHEMA_REHEARSAL
from stages.preflight.sourceinfo import SourceCatalogUnreadable
from tests.support import pg
from tests.support.world import make_world


def _dumps(work_dir: str) -> list[str]:
    return glob.glob(os.path.join(work_dir, "rehearsal-*", "schema.dump"))


def _dumps_of(source: str) -> list[int]:
    """pids of the pg_dump processes dumping `source`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"pg_dump") and any(source.encode() in arg for arg in argv):
            found.append(int(entry))
    return found


def _preflight(control_db, source: str):
    world = make_world(control_db)
    return preflight_source(
        world.project,
        SourceURL.parse_source(pg.url_for(source, sslmode="disable")),
        control_db,
        Sealer(control_db.secret_key),
        recreate=False,
        full=True,
    )


def test_the_schema_is_dumped_while_the_source_is_read(control_db, corpus_source, monkeypatch):
    """The catalog read waits for the dump's archive to appear: done one after the
    other, the archive would never appear while it waits, and the read gives up."""
    source = corpus_source("chinook")
    read = preflight_live.read_source
    seen: list[str] = []

    def read_after_the_dump_began(conn):
        deadline = time.monotonic() + 20
        while not _dumps(control_db.work_dir):
            if time.monotonic() > deadline:
                raise AssertionError("no schema dump started while the source was read")
            time.sleep(0.01)
        seen.extend(_dumps(control_db.work_dir))
        return read(conn)

    monkeypatch.setattr(preflight_live, "read_source", read_after_the_dump_began)
    checked = _preflight(control_db, source)
    assert seen
    checks = {check.name: check.status for check in checked.report.checks}
    assert checks[SCHEMA_REHEARSAL] == "pass", checked.report.checks
    assert checked.report.ok
    assert not any(os.path.exists(path) for path in seen)  # the folder went with the preflight


def test_a_source_whose_catalog_cannot_be_read_stops_the_dump(control_db, corpus_source, monkeypatch):
    """The dump started beside the read is stopped, not waited for to the deadline,
    and its folder removed."""
    source = corpus_source("chinook")
    started: list[str] = []

    def unreadable(conn):
        deadline = time.monotonic() + 20
        while not _dumps(control_db.work_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        started.extend(_dumps(control_db.work_dir))
        raise SourceCatalogUnreadable("permission denied for table pg_class")

    monkeypatch.setattr(preflight_live, "read_source", unreadable)
    checked = _preflight(control_db, source)
    assert started, "the dump did not start beside the read"
    checks = {check.name: (check.status, check.detail) for check in checked.report.checks}
    assert checks["source_reachable"][0] == "fail"
    assert checks[SCHEMA_REHEARSAL][1].startswith("not checked: the source's catalog could not be read")
    assert _dumps(control_db.work_dir) == []
    assert not any(os.path.exists(os.path.dirname(path)) for path in started)
    assert _dumps_of(source) == []  # nothing of it runs on


@pytest.fixture(autouse=True)
def _no_folder_left_before(control_db):
    """Each test looks for the archives of its own preflight only."""
    for path in _dumps(control_db.work_dir):
        os.remove(path)
