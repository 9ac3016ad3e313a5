"""Hostile review of builds beside other tasks without parallel workers (a20a90d):
`_execute(..., beside=progress)` prepends SET LOCAL … to the build's statement string.
Hostile definitions, errors, cancels; the setting never outlives the transaction."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from psycopg2 import sql

from stages.copy.engine import CopyProgress, Lane, _execute
from stages.errors import PermanentError
from tests.support import pg

SETUP = """
CREATE TABLE "we;ird" (id int, body text);
INSERT INTO "we;ird" SELECT g, 'x;' || g FROM generate_series(1, 100) g;
CREATE TABLE child (id int, parent int);
"""


@pytest.fixture
def conn(scratch_db):
    name = scratch_db("capytgt_hbuild")
    pg.psql(name, text=SETUP)
    conn = psycopg2.connect(pg.url_for(name))
    yield conn
    conn.close()


def _beside() -> CopyProgress:
    return CopyProgress(tables_total=1, bytes_total=0, running=3)


def _session_settings(conn) -> tuple[str, str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT current_setting('max_parallel_maintenance_workers'), current_setting('max_parallel_workers_per_gather')"
        )
        row = cur.fetchone()
    conn.rollback()
    return row


def _indexes(conn) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        names = {r[0] for r in cur.fetchall()}
    conn.rollback()
    return names


HOSTILE = {
    "semicolons in names and strings": 'CREATE INDEX "i;1" ON public."we;ird" USING btree (((body || \';\'::text)));',
    "dollar quotes": 'CREATE INDEX "i$2" ON public."we;ird" USING btree (((body || $q$;SET x$q$)));',
    "comments": '/* SET LOCAL max_parallel_maintenance_workers = 8; */ CREATE INDEX i3 ON public."we;ird" (id); -- trailing',
    "percent signs": "CREATE INDEX i4 ON public.\"we;ird\" (id) WHERE body LIKE '%x;%';",
    "leading newline and whitespace": '\n\n   CREATE INDEX i5 ON public."we;ird" (id)',
    "no semicolon at the end": 'CREATE INDEX i6 ON public."we;ird" (body)',
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_definition_builds_beside_others_and_the_session_is_unchanged(conn, name):
    before = _session_settings(conn)
    _execute(HOSTILE[name], f"index {name}", beside=_beside())(Lane(conn))
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert _session_settings(conn) == before == ("2", "2")
    assert len(_indexes(conn)) == 1


def test_a_set_in_the_definition_is_its_own_and_does_not_outlive_the_transaction(conn):
    """A definition with its own SET LOCAL after ours wins inside; neither leaks."""
    statement = (
        "SET LOCAL max_parallel_maintenance_workers = 4; "
        "CREATE TABLE seen AS SELECT current_setting('max_parallel_maintenance_workers') AS m"
    )
    _execute(statement, "a table", beside=_beside())(Lane(conn))
    with conn.cursor() as cur:
        cur.execute("SELECT m FROM seen")
        assert cur.fetchone() == ("4",)
    conn.rollback()
    assert _session_settings(conn) == ("2", "2")


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside"])
@pytest.mark.parametrize(
    ("statement", "what", "expected"),
    [
        ("CREATE INDEX bad ON missing_table (id);", "index bad", 'relation "missing_table" does not exist'),
        ('CREATE UNIQUE INDEX dup ON public."we;ird" ((1));', "index dup", "could not create unique index"),
        ("CREATE INDEX syn ON ;", "index syn", "syntax error"),
        (
            'ALTER TABLE child ADD CONSTRAINT fk FOREIGN KEY (parent) REFERENCES public."we;ird"(id);',
            "foreign key fk",
            "there is no unique constraint",
        ),
    ],
)
def test_a_failing_build_names_the_object_as_alone(conn, statement, what, expected, beside):
    with pytest.raises(PermanentError) as raised:
        _execute(statement, what, beside=_beside() if beside else None)(Lane(conn))
    message = str(raised.value)
    assert message.startswith(f"creating {what} in the preview failed: "), message
    assert expected in message, message
    assert "max_parallel" not in message, message
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert _session_settings(conn) == ("2", "2")


def test_a_composed_statement_beside_others(conn):
    statement = sql.SQL("CREATE INDEX {} ON {} ({})").format(
        sql.Identifier("c;1"), sql.Identifier("public", "we;ird"), sql.Identifier("id")
    )
    _execute(statement, "index c;1", beside=_beside())(Lane(conn))
    assert _indexes(conn) == {"c;1"}
    assert _session_settings(conn) == ("2", "2")


def test_a_cancelled_build_beside_others_is_reported_stopped_and_leaves_the_session_clean(conn):
    pid = conn.get_backend_pid()
    statement = "CREATE TABLE slow AS SELECT pg_sleep(20)::text AS s"
    failures: list[BaseException] = []

    def run() -> None:
        try:
            _execute(statement, "index slow", beside=_beside())(Lane(conn))
        except BaseException as err:  # noqa: BLE001
            failures.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    until = time.monotonic() + 10
    while thread.is_alive() and not pg.admin(
        "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND query LIKE %s", (pid, "%pg_sleep%")
    ):
        assert time.monotonic() < until
        time.sleep(0.05)
    conn.cancel()
    thread.join(10)
    assert not thread.is_alive()
    assert failures and isinstance(failures[0], PermanentError), failures
    assert "creating index slow in the preview was stopped" in str(failures[0]), failures[0]
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert _session_settings(conn) == ("2", "2")
