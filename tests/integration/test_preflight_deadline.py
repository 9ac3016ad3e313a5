"""Preflight's commands get a short deadline of their own."""

from __future__ import annotations

import datetime as dt
import time

from pipeline.preflights import preflight_upload
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads
from tests.support import pg
from tests.support.uploading import upload_file
from tests.support.world import make_world


def test_a_pg_restore_list_that_hangs_fails_the_version_check_in_seconds(
    control_db, store, scratch_db, tmp_path
):
    source = scratch_db()
    pg.psql(source, text="CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    dump = pg.make_dump(source, "custom", tmp_path / "t.dump")
    # This worker's pg_restore never answers (as with a truncated tar it spins on).
    bin_dir = tmp_path / "15" / "bin"
    bin_dir.mkdir(parents=True)
    hanging = bin_dir / "pg_restore"
    hanging.write_text("#!/bin/sh\nsleep 300\n")
    hanging.chmod(0o755)
    settings = control_db.replace(
        pg_bin_dir_template=str(tmp_path / "{major}" / "bin"),
        preflight_command_timeout_seconds=1,
    )
    world = make_world(settings)
    upload = Uploads(store, expiry=dt.timedelta(hours=1)).create(
        world.project, Principal(world.org.id, None, "test")
    )
    upload_file(upload, dump)

    began = time.monotonic()
    result = preflight_upload(
        world.project, upload["object_key"], settings, Sealer(settings.secret_key), store, recreate=False
    )
    assert time.monotonic() - began < 1 + 8
    check = next(c for c in result.report.checks if c.name == "source_version_compatible")
    assert check.status == "fail"
    assert check.detail == (
        "reading the dump's table of contents did not finish within 1 s (CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS); "
        "check that the upload is an undamaged pg_dump output; if it is, try again later or ask the operator "
        "to raise CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS"
    )
    assert not result.report.ok
