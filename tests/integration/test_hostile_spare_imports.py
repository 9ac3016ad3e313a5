"""Hostile review of spare databases in whole imports (in-process: real Runner, stages,
Postgres and S3): with CAPY_SPARE_DATABASES=2, each corpus database imported live and
uploaded equals its source; nothing of the job (rehearsal, preview, restore role) is
left; the cluster holds two spares again afterwards."""

from __future__ import annotations

import time

import pytest

from stages.database import spares
from stages.preflight.sandbox import wait_for_drops
from tests.support import pg
from tests.support.imports import run_import, upload_and_import
from tests.support.world import make_world


@pytest.fixture
def admin(spare_admin):
    return spare_admin


spare_names = pg.spare_names


def leftovers(suffix: str, *, before: frozenset[str] = frozenset()) -> list[str]:
    """The job's preview and restore role (named by `suffix`), and any rehearsal database or
    role but those in `before` (another test's, which a SIGKILL left to the sweep)."""
    return [
        n
        for (n,) in pg.admin(
            "SELECT datname FROM pg_database WHERE datname LIKE 'capy\\_rehearsal\\_%%' "
            "OR datname = %s UNION ALL "
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'capy\\_rehearsal\\_%%' OR rolname = %s",
            ("capy_preview_" + suffix, "capy_restore_" + suffix),
        )
        if n not in before
    ]


@pytest.mark.parametrize("how", ["live", "custom"])
@pytest.mark.parametrize("corpus", ["chinook", "northwind", "pagila"])
def test_imports_with_spares_equal_their_sources_and_leave_nothing(
    control_db, store, corpus_source, admin, tmp_path, corpus, how
):
    settings = control_db.replace(spare_databases=2)
    world = make_world(settings)
    source = corpus_source(corpus)
    before = set(admin.keep_spares(2)[0])
    rehearsals = frozenset(leftovers("none"))
    if how == "live":
        job = run_import(settings, world, pg.url_for(source, sslmode="disable"))
    else:
        job = upload_and_import(settings, store, world, pg.make_dump(source, "custom", tmp_path / "d.dump"))
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    deadline = time.monotonic() + 30
    while len(spare_names()) < 2 or set(spare_names()) & before:
        assert time.monotonic() < deadline, spare_names()
        time.sleep(0.1)
    assert len(spare_names()) == 2
    wait_for_drops()  # the rehearsal's, in a thread of this process
    assert leftovers(job.id.removeprefix("job_"), before=rehearsals) == []
    # What an import's databases are: its owner only, as create_database makes them.
    [(acl,)] = pg.admin(
        "SELECT replace(datacl::text, pg_get_userbyid(datdba), 'OWNER') FROM pg_database WHERE datname = %s",
        (live,),
    )
    assert acl == "{OWNER=CTc/OWNER}"
    assert spares.SPARE_PREFIX not in live
