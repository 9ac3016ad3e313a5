"""The restore's tools run with synchronous_commit=off (stages.tools.restore._preview_env):
what a finished restore made must still survive a crash of the project's cluster
between the restore stage and finalize's swap (found by a hostile review: the post-data
section, ENABLE ROW LEVEL SECURITY and the policies, was lost). The restore stage ends
with ClusterAdmin.flush_wal; the stage's own call is checked in test_live_import."""

from __future__ import annotations

import subprocess

import psycopg2
import pytest

from stages.connections.pgurl import SourceURL
from stages.database.cluster import ClusterAdmin
from stages.tools.commands import PgTools
from stages.tools.restore import restore_section
from tests.support import pg
from tests.support.pgcluster import temporary_cluster

BIN = "/usr/lib/postgresql/15/bin"
SCHEMA = """
CREATE TABLE t (id int, owner text);
ALTER TABLE t ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON t USING (owner = current_user);
"""


@pytest.fixture
def archive(tmp_path):
    name = pg.create_db(pg.scratch_name("capysrc_hostile_async"))
    try:
        pg.psql(name, text=SCHEMA)
        path = tmp_path / "schema.dump"
        subprocess.run(
            ["pg_dump", "-Fc", "--schema-only", "-d", pg.url_for(name), f"--file={path}"],
            check=True,
            capture_output=True,
        )
    finally:
        pg.drop_db(name)
    listing = tmp_path / "restore.list"
    listing.write_text(
        subprocess.run(["pg_restore", "-l", str(path)], check=True, capture_output=True, text=True).stdout
    )
    return path, listing


def test_what_a_finished_restore_made_survives_a_crash_of_the_cluster(archive):
    path, listing = archive
    # A quiet cluster: the WAL writer flushes asynchronous commits every 10 s (the default
    # is 0.2 s: the window is shorter, not closed).
    with temporary_cluster(BIN, settings="-c wal_writer_delay=10000") as cluster:
        admin = psycopg2.connect(cluster.url())
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE preview")
        admin.close()
        target = SourceURL.parse(cluster.url("preview"), default_sslmode=None)
        tools = PgTools(BIN)
        for section in ("pre-data", "post-data"):
            restore_section(tools, target, str(path), section, list_file=str(listing))
        ClusterAdmin(cluster.url()).flush_wal()  # how the restore stage ends
        cluster.stop()  # the cluster crashes (immediate stop: no shutdown checkpoint)
        cluster.start()
        conn = psycopg2.connect(cluster.url("preview"))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT relrowsecurity FROM pg_class WHERE relname = 't'")
                rls = cur.fetchone()
                cur.execute("SELECT count(*) FROM pg_policy")
                policies = cur.fetchone()[0]
        finally:
            conn.close()
        assert rls == (True,) and policies == 1, (rls, policies)
