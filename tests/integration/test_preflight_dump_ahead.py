"""The live preflight's schema dump runs beside its reading of the source.

The rehearsal's `pg_dump --schema-only` starts once the source's address is pinned,
while the source's catalog is read and the other checks run (stages.preflight.live
`_schema_dumped_ahead`); a preflight that ends without rehearsing stops it and leaves
no folder behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading
import time

import pytest

from pipeline.preflights import preflight_source
from pipeline.sealing import Sealer
from stages.connections.pgurl import SourceURL
from stages.preflight import live as preflight_live
from stages.preflight.registry import SCHEMA_REHEARSAL
from stages.preflight.sourceinfo import SourceCatalogUnreadable
from tests.support import pg
from tests.support.muteproxy import MuteAfterLogin
from tests.support.processes import running_processes
from tests.support.world import make_world


def _dumps(work_dir: str) -> list[str]:
    return glob.glob(os.path.join(work_dir, "rehearsal-*", "schema.dump"))


def _dumps_of(source: str) -> list[int]:
    """pids of the pg_dump processes dumping `source`."""
    return [
        pid
        for pid, argv, _env in running_processes()
        if argv[0].endswith(b"pg_dump") and any(source.encode() in arg for arg in argv)
    ]


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


class TimeLimit(BaseException):
    """As Dramatiq's time limit arrives: raised in the stage's thread from another."""


def test_a_time_limit_while_the_dump_is_awaited_stops_it_before_it_propagates(
    control_db, corpus_source, monkeypatch
):
    """pg_dump logs in, then nothing answers it; the preflight, waiting for it, gets a
    time limit. The dump is stopped before the exception leaves the preflight, as when
    pg_dump ran in the stage's own thread (found by review: a Thread.join interrupted
    so let the wait end before the dump did)."""
    source = corpus_source("chinook")
    mute = MuteAfterLogin(5432)
    dump, ahead = preflight_live.dump_live_schema, preflight_live._schema_dumped_ahead

    def dump_through_mute(tools, pinned, path, deadline, **options):
        return dump(tools, pinned.with_params(port=str(mute.port)), path, deadline, **options)

    @contextlib.contextmanager
    def interrupted_while_waiting(setup, pinned):
        with ahead(setup, pinned) as wait:

            def waiting():
                me = threading.get_ident()
                raise_in_me = lambda: ctypes.pythonapi.PyThreadState_SetAsyncExc(  # noqa: E731
                    ctypes.c_ulong(me), ctypes.py_object(TimeLimit)
                )
                threading.Timer(1.0, raise_in_me).start()
                return wait()

            yield waiting

    monkeypatch.setattr(preflight_live, "dump_live_schema", dump_through_mute)
    monkeypatch.setattr(preflight_live, "_schema_dumped_ahead", interrupted_while_waiting)
    try:
        with pytest.raises(TimeLimit):
            _preflight(control_db, source)
        assert mute.logged_in.is_set()  # the dump was under way, held by the source
        assert _dumps_of(str(mute.port)) == []
        assert [t.name for t in threading.enumerate() if t.name == "rehearsal-dump"] == []
        assert glob.glob(os.path.join(control_db.work_dir, "rehearsal-*")) == []
    finally:
        mute.close()


@pytest.fixture(autouse=True)
def _no_folder_left_before(control_db):
    """Each test looks for the archives of its own preflight only."""
    for path in _dumps(control_db.work_dir):
        os.remove(path)
