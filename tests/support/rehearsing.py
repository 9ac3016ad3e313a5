"""Running the schema rehearsal in tests: on a live source directly, or as the API's
preflight of an uploaded dump; and archive entries as the rehearsal sees them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.imports import ImportRequest
from pipeline.preflights import run_preflight
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from stages.database.cluster import ClusterAdmin
from stages.preflight.rehearsal import Rehearsal, rehearse_live
from stages.preflight.report import Check
from stages.preflight.sandbox import Sandbox
from stages.tools.commands import PgTools
from stages.tools.timelimit import Deadline, Limit
from tests.support import pg
from tests.support.copying import PG_BIN, source_url
from tests.support.imports import create_upload
from tests.support.uploading import upload_file
from tests.support.world import make_world


@dataclass(frozen=True)
class Entry:
    """An archive entry as stages.preflight.implied reads it."""

    dump_id: int
    desc: str
    depends_on: tuple[int, ...] = ()
    namespace: str = "public"
    name: str = ""


def rehearse_source(dbname: str, work_dir: Path) -> Rehearsal:
    """The rehearsal of the local database `dbname`'s schema, as a live import's preflight runs it."""
    return rehearse_live(
        PgTools(PG_BIN),
        source_url(dbname),
        Sandbox(ClusterAdmin(pg.ADMIN_URL)),
        str(work_dir),
        Deadline.after(Limit(120, "test", "")),
        allowed_extensions=set(),
    )


def preflight_checks_of_upload(control_db, store, dump: bytes) -> dict[str, Check]:
    """The API preflight's checks, by name, of `dump` uploaded to a new project."""
    world = make_world(control_db)
    upload = create_upload(store, world)
    upload_file(upload, dump)
    result = run_preflight(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=True, upload_key=upload["object_key"]),
        control_db,
        Sealer(control_db.secret_key),
        store,
    )
    return {check.name: check for check in result.report.checks}
