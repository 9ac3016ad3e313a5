"""Our sessions on a project cluster never JIT-compile their statements.

Found on the bench's `many` source (2,000 tables): right after the copy, the engine's
query for partitioned tables was planned from the new preview's catalog, which has no
statistics yet, estimated at 1.5 million, and JIT-compiled for 100 to 330 ms to return
no rows in 1 ms. Any catalog query of the import could pay the same. Here the database
asks every session to JIT-compile every statement (as a tenant's ALTER DATABASE could,
or as a catalog that large does); a plain session shows it does, ours must not.
"""

from __future__ import annotations

import json

import psycopg2
import pytest
from psycopg2 import sql

from stages.database.cluster import ClusterAdmin
from tests.support import pg

EVERY_STATEMENT_COMPILED = ("jit = on", "jit_above_cost = 0", "jit_optimize_above_cost = 0")
PROBE = "EXPLAIN (ANALYZE, FORMAT JSON) SELECT pg_catalog.count(*) FROM pg_catalog.pg_class"


def compiled(cur: psycopg2.extensions.cursor) -> bool:
    """Whether the probe's plan was JIT-compiled."""
    cur.execute(PROBE)
    (plan,) = cur.fetchone()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    return "JIT" in plan[0]


@pytest.fixture
def compiling_db(scratch_db):
    name = scratch_db("capyjit")
    for setting in EVERY_STATEMENT_COMPILED:
        pg.admin(sql.SQL("ALTER DATABASE {} SET " + setting).format(sql.Identifier(name)))
    with pg.admin_cursor(name) as cur:
        cur.execute("SELECT pg_catalog.pg_jit_available()")
        if not cur.fetchone()[0]:
            pytest.fail("this server cannot JIT-compile (llvmjit missing): the test would prove nothing")
        assert compiled(cur), "a plain session in the database should JIT-compile the probe"
    return name


def test_an_admin_session_does_not_jit_compile(compiling_db):
    with ClusterAdmin(pg.ADMIN_URL).autocommit(compiling_db) as cur:
        assert not compiled(cur)


def test_a_tenant_role_session_does_not_jit_compile(compiling_db):
    admin = ClusterAdmin(pg.ADMIN_URL)
    role = pg.scratch_name("capy_restore_jit")
    login = admin.ensure_restore_role(role)
    try:
        with admin.role_connection(compiling_db, login) as conn, conn.cursor() as cur:
            assert not compiled(cur)
        conn = admin.open_role_connection(compiling_db, login, readonly=False)
        try:
            with conn.cursor() as cur:
                assert not compiled(cur)
        finally:
            conn.close()
    finally:
        admin.drop_role(role)
