"""Large objects, streamed from the snapshot into the preview in chunks.

The schema archive leaves them out (`pg_dump --no-blobs`): in it they would be a local
file as large as they are. Each object is created in the preview with its source OID
(what the tables that reference it hold), its bytes copied `CHUNK` at a time
(`lo_get` on the source, `lo_put` on the preview), and its comment set. Owners and
grants are not replayed, as for every other object (the project's role owns them
after the hand-over).
"""

from __future__ import annotations

import contextlib
import time

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from stages.connections.rows import one_row
from stages.copy.stream import Flow

CHUNK = 1 << 20
COMMIT_EVERY = 1000

_OBJECTS = """
SELECT m.oid, d.description
FROM pg_catalog.pg_largeobject_metadata m
LEFT JOIN pg_catalog.pg_description d
  ON d.objoid OPERATOR(pg_catalog.=) m.oid
 AND d.classoid OPERATOR(pg_catalog.=) 'pg_catalog.pg_largeobject'::pg_catalog.regclass
ORDER BY m.oid
"""


def copy_large_objects(
    source: psycopg2.extensions.connection, target: psycopg2.extensions.connection, flow: Flow
) -> int:
    """Copy every large object of `source` (a session in the snapshot) into `target`
    (a preview session, not in autocommit); return how many. `flow` counts their bytes.
    On failure the preview's open transaction is rolled back."""
    try:
        return _copy_all(source, target, flow)
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            target.rollback()
        raise


def _copy_all(
    source: psycopg2.extensions.connection, target: psycopg2.extensions.connection, flow: Flow
) -> int:
    with source.cursor() as cur:
        cur.execute(_OBJECTS)
        objects = cur.fetchall()
    with source.cursor() as src, target.cursor() as dst:
        for done, (oid, comment) in enumerate(objects, start=1):
            dst.execute("SELECT pg_catalog.lo_create(%s)", (oid,))
            offset = 0
            while True:
                src.execute("SELECT pg_catalog.lo_get(%s, %s, %s)", (oid, offset, CHUNK))
                data = one_row(src)[0]
                if not data:
                    break
                dst.execute("SELECT pg_catalog.lo_put(%s, %s, %s)", (oid, offset, data))
                offset += len(data)
                flow.bytes += len(data)
                flow.last = time.monotonic()
            if comment is not None:
                dst.execute(
                    sql.SQL("COMMENT ON LARGE OBJECT {} IS %s").format(sql.Literal(int(oid))), (comment,)
                )
            flow.rows += 1
            flow.last = time.monotonic()
            if done % COMMIT_EVERY == 0:
                target.commit()
    target.commit()
    return len(objects)
