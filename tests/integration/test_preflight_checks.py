"""Preflight against real sources: the local PostgreSQL 15, a PostgreSQL 18 server (newer
than the target), a password-protected cluster, a toy pooler, a port that never answers,
real dumps of every format and a real S3 server. Every check's detail is asserted.

Traffic stays on 127.0.0.1: host names that are not local are pinned to 127.0.0.1 by an
injected resolver, so nothing is ever looked up in DNS.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from stages.connections.pgurl import SourceURL
from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.errors import ObjectMissing
from stages.preflight import LIVE_CHECKS, UPLOAD_CHECKS, Preflight, Target
from stages.preflight.extensions import DEFAULT_EXTENSION_ALLOWLIST
from stages.preflight.live import NO_REHEARSAL, check_live_source
from stages.preflight.sourceinfo import read_only_session
from stages.preflight.targetinfo import describe_target
from stages.preflight.upload import check_upload_head
from stages.storage import new_object_key
from stages.tools.commands import PgTools
from tests.support import pg
from tests.support.newer_postgres import NEWER_MAJOR, newer_cluster, newer_tool
from tests.support.pgcluster import TempCluster, free_port
from tests.support.pgproxy import silent_listener, toy_pooler

ADMIN = ClusterAdmin(pg.ADMIN_URL)
# Target databases are read as an unprivileged role, as a project's are by its own role.
INSPECTOR = RoleLogin(f"capy_tst_inspector_{secrets.token_hex(3)}", "trust-auth-ignores-it")
TOOLS = PgTools("/usr/lib/postgresql/15/bin")
GiB = 1024**3
ALLOWED = (
    "btree_gin, btree_gist, citext, fuzzystrmatch, hstore, ltree, pg_stat_statements, pg_trgm, "
    "pgcrypto, plpgsql, postgis, unaccent, uuid-ossp, vector"
)
UNREACHABLE = "not checked: the source database could not be reached (see source_reachable)"
NOT_REHEARSED = ("warn", f"not checked: {NO_REHEARSAL}")
CLEAN_OBJECTS = {
    "no_event_triggers": ("pass", "no event triggers"),
    "no_untrusted_languages": ("pass", "no untrusted procedural languages"),
    "no_large_objects": ("pass", "no large objects"),
    "no_foreign_servers": ("pass", "no foreign servers"),
    "no_logical_replication": ("pass", "no publications or subscriptions"),
}
OBJECT_WARNINGS = {
    "no_event_triggers": (
        "warn",
        "event triggers capy_audit_ddl: creating them needs superuser, which a managed database does not "
        "grant, so the import leaves them out; recreate what they do another way after the import",
    ),
    "no_untrusted_languages": (
        "warn",
        "untrusted procedural languages plsampleu: creating them needs superuser, which a managed database "
        "does not grant, so the import leaves them out and functions written in them cannot be restored; "
        "rewrite those functions in a trusted language such as plpgsql",
    ),
    "no_large_objects": (
        "warn",
        "2 large objects: they are restored one by one, which is slow when there are many, and their data "
        "counts towards the storage limit",
    ),
    "no_foreign_servers": (
        "warn",
        "foreign servers capy_elsewhere: they point at data outside this database; the import leaves out "
        "user mappings (they hold the source's credentials) and foreign-data wrappers that need superuser",
    ),
    "no_logical_replication": (
        "warn",
        "publications capy_pub and subscriptions capy_sub: logical replication is not carried over; the "
        "import leaves out subscriptions (they need superuser), and publications have no subscribers after it",
    ),
}
# Everything a managed target cannot restore as it is, and an extension outside the allowlist.
WARN_SOURCE_SQL = """
CREATE EXTENSION citext;
CREATE EXTENSION cube;
CREATE TABLE t (id int PRIMARY KEY, name citext, box cube);
INSERT INTO t VALUES (1, 'a', '(1,2)');
CREATE FUNCTION capy_ddl_audit() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE EVENT TRIGGER capy_audit_ddl ON ddl_command_start EXECUTE FUNCTION capy_ddl_audit();
CREATE FUNCTION capy_plsample_handler() RETURNS language_handler AS 'plpgsql', 'plpgsql_call_handler' LANGUAGE C;
CREATE LANGUAGE plsampleu HANDLER capy_plsample_handler;
SELECT lo_from_bytea(0, 'hello'), lo_from_bytea(0, 'world');
CREATE FOREIGN DATA WRAPPER capy_dummy_fdw;
CREATE SERVER capy_elsewhere FOREIGN DATA WRAPPER capy_dummy_fdw;
SET client_min_messages = error;
CREATE PUBLICATION capy_pub FOR TABLE t;
CREATE SUBSCRIPTION capy_sub CONNECTION 'host=127.0.0.1 dbname=nowhere' PUBLICATION capy_pub
    WITH (connect = false);
"""


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warn_source() -> Iterator[str]:
    name = pg.create_db(pg.scratch_name("capysrc_warn"))
    try:
        pg.psql(name, text=WARN_SOURCE_SQL)
        yield name
    finally:
        # A database with a subscription cannot be dropped; one without a slot can go.
        pg.psql(name, text="ALTER SUBSCRIPTION capy_sub SET (slot_name = NONE); DROP SUBSCRIPTION capy_sub;")
        pg.drop_db(name)


@pytest.fixture(scope="module")
def newer() -> Iterator[TempCluster]:
    """A PostgreSQL 18 cluster with `plain18` (citext only) and `exts18` (citext, vector
    and cube): it must start, the tests fail otherwise."""
    with newer_cluster() as cluster:
        for name, sql in (
            (
                "plain18",
                "CREATE EXTENSION citext; CREATE TABLE t (id int, name citext); INSERT INTO t VALUES (1, 'a');",
            ),
            ("exts18", "CREATE EXTENSION citext; CREATE EXTENSION vector; CREATE EXTENSION cube;"),
        ):
            pg.psql("postgres", text=f"CREATE DATABASE {name}", url=cluster.url())
            pg.psql(name, text=sql, url=cluster.url(name))
        yield cluster


@pytest.fixture(scope="module", autouse=True)
def inspector_role() -> Iterator[None]:
    pg.admin(f'CREATE ROLE "{INSPECTOR.name}" LOGIN')
    yield
    pg.admin(f'DROP ROLE "{INSPECTOR.name}"')


@pytest.fixture
def target_db(scratch_db) -> str:
    return scratch_db("capytgt")


def target_for(dbname: str, *, recreate: bool = False, limit: int = 10 * GiB) -> Target:
    return describe_target(
        ADMIN,
        dbname,
        owner=INSPECTOR,
        recreate=recreate,
        storage_limit_bytes=limit,
        allowlist=DEFAULT_EXTENSION_ALLOWLIST,
    )


def local(dbname: str) -> SourceURL:
    return SourceURL.parse(pg.url_for(dbname, sslmode="disable"))


def checks_of(report: Preflight) -> dict[str, tuple[str, str]]:
    return {check.name: (check.status, check.detail) for check in report.checks}


def mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def local_version() -> str:
    return pg.admin("SHOW server_version")[0][0]


def short(version: str) -> str:
    return version.split(" ", 1)[0]


def live_ok(
    url: SourceURL, report: Preflight, *, limit: int = 10 * GiB, extensions: str | None = None
) -> dict:
    """The checks of a clean source on the local cluster, allowed as private."""
    size = report.source["database_size_bytes"]
    return {
        "source_address_allowed": (
            "pass",
            f"{url.host} resolves to 127.0.0.1, a loopback address (127.0.0.0/8), allowed by the operator "
            "(CAPY_ALLOW_PRIVATE_SOURCES); the import connects to that address only",
        ),
        "source_reachable": ("pass", f"connected to {url.redacted()} as {url.user}"),
        "not_a_transaction_pooler": (
            "pass",
            f"{url.host}:{url.port} is not a known pooler address, and the connection kept one server session",
        ),
        "source_version_compatible": (
            "pass",
            f"source PostgreSQL {short(local_version())} can be restored into PostgreSQL 15",
        ),
        "source_size_within_plan": (
            "pass",
            f"the source database uses {mib(size)} of the project's {limit / GiB:.1f} GiB storage limit "
            f"({100 * size // limit} %)",
        ),
        "extensions_available_on_target": (
            "pass",
            extensions or "the source database uses no extensions besides plpgsql",
        ),
        "target_database_empty": ("pass", "the project's database is empty"),
        **CLEAN_OBJECTS,
        "schema_rehearsal": NOT_REHEARSED,
    }


# -- live sources ----------------------------------------------------------------------


def test_a_clean_source_passes_every_check(corpus_source, target_db):
    source = corpus_source("chinook")
    url = local(source)
    target = target_for(target_db)
    report = check_live_source(url, target, allow_private=True)
    assert [check.name for check in report.checks] == list(LIVE_CHECKS)
    assert checks_of(report) == live_ok(url, report)
    assert report.ok
    size = pg.admin("SELECT pg_database_size(%s)", (source,))[0][0]
    assert abs(report.source["database_size_bytes"] - size) < 1024 * 1024
    response = report.as_response(target)
    assert set(response) == {"checks", "ok", "source", "storage_limit_bytes", "target_version"}
    assert response["ok"] is True and response["storage_limit_bytes"] == 10 * GiB
    assert response["target_version"] == local_version()
    assert response["source"] == {
        "database_size_bytes": report.source["database_size_bytes"],
        "server_version": local_version(),
        "extensions": [{"name": "plpgsql", "version": "1.0"}],
        "provider": "unknown",
        "schemas": ["public"],
        "table_count": 11,
        "largest_tables": response["source"]["largest_tables"],
        "large_objects": 0,
        "event_triggers": [],
        "untrusted_languages": [],
        "foreign_servers": [],
        "publications": [],
        "subscriptions": [],
    }
    largest = response["source"]["largest_tables"]
    assert len(largest) == 5 and largest[0]["name"] == "public.playlist_track"
    assert [t["bytes"] for t in largest] == sorted((t["bytes"] for t in largest), reverse=True)
    # Later stages connect to exactly the address that was checked.
    assert report.pinned is not None and report.pinned.params["hostaddr"] == "127.0.0.1"


def test_objects_a_managed_target_cannot_restore_warn_and_an_unlisted_extension_fails(warn_source, target_db):
    url = local(warn_source)
    report = check_live_source(url, target_for(target_db), allow_private=True)
    expected = live_ok(url, report) | OBJECT_WARNINGS
    expected["extensions_available_on_target"] = (
        "fail",
        f"the source database uses extensions CapyDB does not allow: cube 1.5 (allowed: {ALLOWED}). "
        "Drop them from the source (DROP EXTENSION) and import again",
    )
    assert checks_of(report) == expected
    assert not report.ok
    assert report.source["extensions"] == [
        {"name": "citext", "version": "1.6"},
        {"name": "cube", "version": "1.5"},
        {"name": "plpgsql", "version": "1.0"},
    ]
    assert report.source["large_objects"] == 2
    assert report.source["event_triggers"] == ["capy_audit_ddl"]


def test_an_allowlisted_extension_passes_and_a_configured_allowlist_refuses_it(warn_source, target_db):
    url = local(warn_source)
    strict = describe_target(
        ADMIN,
        target_db,
        owner=INSPECTOR,
        recreate=False,
        storage_limit_bytes=10 * GiB,
        allowlist=("cube", "citext"),
    )
    assert checks_of(check_live_source(url, strict, allow_private=True))[
        "extensions_available_on_target"
    ] == (
        "pass",
        "the source database uses citext 1.6, cube 1.5: all allowed and available on the project's cluster",
    )
    only_cube = describe_target(
        ADMIN, target_db, owner=INSPECTOR, recreate=False, storage_limit_bytes=10 * GiB, allowlist=("cube",)
    )
    assert checks_of(check_live_source(url, only_cube, allow_private=True))[
        "extensions_available_on_target"
    ] == (
        "fail",
        "the source database uses extensions CapyDB does not allow: citext 1.6 (allowed: cube, plpgsql). "
        "Drop them from the source (DROP EXTENSION) and import again",
    )


def test_a_source_newer_than_the_target_fails_the_version_check(newer, target_db):
    url = SourceURL.parse(newer.url("plain18"))
    report = check_live_source(url, target_for(target_db), allow_private=True)
    checks = checks_of(report)
    version = short(report.source["server_version"])
    assert version.startswith(f"{NEWER_MAJOR}.")
    assert checks["source_reachable"] == ("pass", f"connected to {url.redacted()} as capy_admin")
    assert checks["source_version_compatible"] == (
        "fail",
        f"the source runs PostgreSQL {version}, newer than the project's PostgreSQL 15; imports cannot "
        f"downgrade. Use a project on a cluster running PostgreSQL {NEWER_MAJOR} or later",
    )
    # PostgreSQL 18 ships citext 1.8; the project's cluster has 1.6.
    assert checks["extensions_available_on_target"] == (
        "warn",
        "the project's cluster has older versions of: citext (source 1.8, project 1.6); the restore creates "
        "the project's version, so objects that need the newer one may fail to restore",
    )
    assert not report.ok
    with pytest.raises(Exception, match="preflight check source_version_compatible failed"):
        report.raise_for_failure()


def test_extensions_the_target_cannot_install_are_named(newer, target_db):
    url = SourceURL.parse(newer.url("exts18"))
    report = check_live_source(url, target_for(target_db), allow_private=True)
    vector = next(e["version"] for e in report.source["extensions"] if e["name"] == "vector")
    assert checks_of(report)["extensions_available_on_target"] == (
        "fail",
        f"the source database uses extensions CapyDB does not allow: cube 1.5 (allowed: {ALLOWED}); it also "
        f"uses allowed extensions that the project's cluster cannot install: vector {vector}; the project's "
        "cluster has older versions of: citext (source 1.8, project 1.6). Drop them from the source "
        "(DROP EXTENSION) and import again",
    )


def test_source_size_against_the_storage_limit(corpus_source, target_db):
    url = local(corpus_source("chinook"))
    size = check_live_source(url, target_for(target_db), allow_private=True).source["database_size_bytes"]

    def size_check(limit: int) -> tuple[str, str]:
        return checks_of(check_live_source(url, target_for(target_db, limit=limit), allow_private=True))[
            "source_size_within_plan"
        ]

    small = 1024 * 1024
    assert size_check(small) == (
        "fail",
        f"the source database is {mib(size)} of the project's 1.0 MiB storage limit ({size} > {small} bytes); "
        "raise the project's storage limit or import less data",
    )
    near = size * 100 // 90
    assert size_check(near) == (
        "warn",
        f"the source database uses {mib(size)} of the project's {mib(near)} storage limit "
        f"({100 * size // near} %), over 80 %; the imported database leaves little room to grow",
    )


def test_a_non_empty_target_fails_unless_recreate(corpus_source, target_db):
    pg.psql(target_db, text="CREATE TABLE existing (id int); INSERT INTO existing VALUES (7);")
    url = local(corpus_source("chinook"))
    report = check_live_source(url, target_for(target_db, recreate=False), allow_private=True)
    assert checks_of(report)["target_database_empty"] == (
        "fail",
        'the project\'s database already holds tables or other objects; send "recreate": true to replace '
        "them (the current database is kept aside), or import into an empty project",
    )
    assert not report.ok
    replacing = check_live_source(url, target_for(target_db, recreate=True), allow_private=True)
    assert checks_of(replacing)["target_database_empty"] == (
        "pass",
        'the project\'s database holds objects; "recreate": true replaces it (the current database is '
        "kept aside, renamed)",
    )
    assert replacing.ok


def test_nothing_listening_is_connection_refused_and_target_checks_still_run(target_db):
    port = free_port()
    url = SourceURL.parse(f"postgresql://app:pw@127.0.0.1:{port}/app?sslmode=disable")
    report = check_live_source(url, target_for(target_db), allow_private=True)
    assert [check.name for check in report.checks] == list(LIVE_CHECKS)
    assert checks_of(report) == {
        "source_address_allowed": (
            "pass",
            "127.0.0.1 resolves to 127.0.0.1, a loopback address (127.0.0.0/8), allowed by the operator "
            "(CAPY_ALLOW_PRIVATE_SOURCES); the import connects to that address only",
        ),
        "source_reachable": (
            "fail",
            f"the source database at 127.0.0.1:{port} refused the connection (connection refused): nothing "
            "accepts connections there, or the server is restarting; check the host and port and that the "
            "database is running",
        ),
        "not_a_transaction_pooler": (
            "warn",
            f"not checked: 127.0.0.1:{port} is not a known pooler address, but the source database could not "
            "be reached (see source_reachable)",
        ),
        "source_version_compatible": ("warn", UNREACHABLE),
        "source_size_within_plan": ("warn", UNREACHABLE),
        "extensions_available_on_target": ("warn", UNREACHABLE),
        "target_database_empty": ("pass", "the project's database is empty"),
        **{name: ("warn", UNREACHABLE) for name in CLEAN_OBJECTS},
        "schema_rehearsal": ("warn", UNREACHABLE),
    }
    assert report.source == {
        "database_size_bytes": None,
        "server_version": None,
        "extensions": [],
        "provider": "unknown",
    }


def test_a_port_that_never_answers_times_out(target_db):
    with silent_listener() as listener:
        url = SourceURL.parse(f"postgresql://app:pw@127.0.0.1:{listener.port}/app")
        report = check_live_source(url, target_for(target_db), allow_private=True, timeout=2)
    checks = checks_of(report)
    assert checks["source_reachable"] == (
        "fail",
        f"the source database at 127.0.0.1:{listener.port} did not answer within the 2 s connect timeout; "
        "check the host, port and firewall",
    )
    assert checks["source_version_compatible"] == ("warn", UNREACHABLE)
    assert checks["target_database_empty"] == ("pass", "the project's database is empty")


def test_a_wrong_password_is_told_apart(password_source, target_db):
    url = SourceURL.parse(password_source.url("chinook", password="wrong-password"))
    report = check_live_source(url, target_for(target_db), allow_private=True)
    assert checks_of(report)["source_reachable"] == (
        "fail",
        f"the source database at 127.0.0.1:{password_source.port} refused the login for user 'capy_admin': "
        "password authentication failed; check the user name and password",
    )
    assert checks_of(report)["extensions_available_on_target"] == ("warn", UNREACHABLE)
    right = check_live_source(
        SourceURL.parse(password_source.url("chinook")), target_for(target_db), allow_private=True
    )
    assert right.ok, right.first_failure()


def test_loopback_is_refused_unless_private_sources_are_allowed(corpus_source, target_db):
    url = local(corpus_source("chinook"))
    report = check_live_source(url, target_for(target_db), allow_private=False)
    blocked = "not checked: the source address is not allowed (see source_address_allowed)"
    checks = checks_of(report)
    assert checks["source_address_allowed"] == (
        "fail",
        "the source host '127.0.0.1' resolves to 127.0.0.1, a loopback address (127.0.0.0/8); imports connect only to "
        "publicly reachable databases. Use the database's public host name (an operator can allow private "
        "sources with CAPY_ALLOW_PRIVATE_SOURCES=true)",
    )
    assert checks["source_reachable"] == ("warn", blocked)
    assert checks["source_size_within_plan"] == ("warn", blocked)
    assert checks["target_database_empty"] == ("pass", "the project's database is empty")
    assert report.pinned is None and not report.ok


def test_sslmode_require_is_used_unless_the_url_sets_it(corpus_source, target_db):
    # The local server has no TLS: a URL without sslmode is refused for that reason.
    url = SourceURL.parse(pg.url_for(corpus_source("chinook")))
    report = check_live_source(url, target_for(target_db), allow_private=True)
    assert checks_of(report)["source_reachable"] == (
        "fail",
        "the source database at 127.0.0.1:5432 does not accept SSL connections; add ?sslmode=disable to the "
        "URL only if the network between us is trusted",
    )


def test_a_pooler_host_fails_and_the_checked_address_is_the_one_used(corpus_source, target_db):
    source = corpus_source("chinook")
    host = "ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech"
    url = SourceURL.parse(f"postgresql://postgres@{host}:5432/{source}?sslmode=disable")
    # The name is pinned to the local server: the connection goes where the check said.
    report = check_live_source(
        url, target_for(target_db), allow_private=True, resolver=lambda h, p: ["127.0.0.1"]
    )
    checks = checks_of(report)
    assert checks["source_address_allowed"] == (
        "pass",
        f"{host} resolves to 127.0.0.1, a loopback address (127.0.0.0/8), allowed by the operator "
        "(CAPY_ALLOW_PRIVATE_SOURCES); the import connects to that address only",
    )
    assert checks["source_reachable"] == ("pass", f"connected to {url.redacted()} as postgres")
    assert checks["not_a_transaction_pooler"] == (
        "fail",
        f"{host}:5432 is Neon's connection pooler (PgBouncer in transaction mode: the host name ends in "
        "-pooler); use the direct connection string, host ep-cool-darkness-123456.us-east-2.aws.neon.tech: "
        "pg_dump needs one session for its consistent snapshot",
    )
    assert report.source["provider"] == "neon"


@pytest.mark.parametrize(
    ("options", "status", "detail"),
    [
        (
            {},
            "warn",
            "{where} answers through a connection pooler or proxy (the backend pid it announced at login is "
            "not the pid of the session that answers); if it pools transactions the import will fail; use "
            "the direct (session) connection string of the database",
        ),
        (
            {"reject_options": True},
            "warn",
            "{where} answers through a connection pooler or proxy (it refused the startup parameter options, "
            "as PgBouncer does); if it pools transactions the import will fail; use the direct (session) "
            "connection string of the database",
        ),
        (
            {"backends": 2},
            "fail",
            "{where} is a transaction pooler: two consecutive transactions ran in different server sessions, "
            "so pg_dump could not keep one snapshot; use the direct (session) connection string of the database",
        ),
    ],
)
def test_a_pooler_is_noticed_at_run_time(corpus_source, target_db, options, status, detail):
    with toy_pooler(5432, **options) as pooler:
        url = SourceURL.parse(
            pg.url_for(corpus_source("chinook"), sslmode="disable").replace(":5432/", f":{pooler.port}/")
        )
        report = check_live_source(url, target_for(target_db), allow_private=True)
    checks = checks_of(report)
    assert checks["source_reachable"] == ("pass", f"connected to {url.redacted()} as postgres")
    assert checks["not_a_transaction_pooler"] == (status, detail.format(where=f"127.0.0.1:{pooler.port}"))
    assert checks["source_version_compatible"][0] == "pass"


def test_catalogs_the_user_may_not_read(scratch_db, target_db):
    source = scratch_db("capysrc_locked")
    role = pg.scratch_name("capy_reader")
    pg.admin(f'CREATE ROLE "{role}" LOGIN')
    try:
        url = SourceURL.parse(pg.url_for(source, sslmode="disable").replace("postgres@", f"{role}@"))
        pg.psql(source, text="REVOKE SELECT ON pg_catalog.pg_largeobject_metadata FROM PUBLIC;")
        report = check_live_source(url, target_for(target_db), allow_private=True)
        assert checks_of(report)["no_large_objects"] == (
            "warn",
            "not checked: the source's catalog could not be read for it (permission denied for table "
            "pg_largeobject_metadata)",
        )
        assert checks_of(report)["no_event_triggers"] == ("pass", "no event triggers")
        pg.psql(source, text="REVOKE EXECUTE ON FUNCTION pg_database_size(name) FROM PUBLIC;")
        report = check_live_source(url, target_for(target_db), allow_private=True)
        blocked = "not checked: the source's catalog could not be read (see source_reachable)"
        checks = checks_of(report)
        assert checks["source_reachable"] == (
            "fail",
            f"connected to {url.redacted()} as {role}, but could not read its catalog (permission denied for "
            "function pg_database_size); the user needs to be able to read the system catalogs",
        )
        assert checks["source_size_within_plan"] == ("warn", blocked)
        assert checks["no_large_objects"] == ("warn", blocked)
    finally:
        pg.drop_db(source)
        pg.admin(f'DROP ROLE IF EXISTS "{role}"')


def test_the_source_sees_only_read_only_transactions(corpus_source):
    url = local(corpus_source("chinook"))
    with read_only_session(url, timeout=10) as (conn, refused):
        assert not refused
        with conn.cursor() as cur:
            cur.execute(
                "SELECT current_setting('default_transaction_read_only'), current_setting('transaction_read_only')"
            )
            assert cur.fetchone() == ("on", "on")
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                cur.execute("CREATE TABLE capy_should_not_exist (id int)")
        conn.rollback()
    # A URL cannot ask for a writable session.
    writable = SourceURL.parse(
        url.url() + "&options=-c%20default_transaction_read_only%3Doff&target_session_attrs=read-write"
    )
    with read_only_session(writable, timeout=10) as (conn, refused):
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('default_transaction_read_only')")
            assert cur.fetchone() == ("on",)
        conn.rollback()
    # Behind a pooler that drops the startup options, BEGIN READ ONLY still guards.
    with toy_pooler(5432, reject_options=True) as pooler:
        pooled = SourceURL.parse(str(url.url()).replace(":5432/", f":{pooler.port}/"))
        with read_only_session(pooled, timeout=10) as (conn, refused):
            assert refused
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT current_setting('default_transaction_read_only'), current_setting('transaction_read_only')"
                )
                assert cur.fetchone() == ("off", "on")
                with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                    cur.execute("CREATE TABLE capy_should_not_exist (id int)")
            conn.rollback()


def test_preflight_changes_nothing_on_the_source_or_the_target(warn_source, target_db, tmp_path):
    before = (pg.schema_dump(warn_source), pg.row_counts(warn_source), pg.schema_dump(target_db))
    lo_before = pg.admin("SELECT count(*) FROM pg_largeobject_metadata", dbname=warn_source)
    check_live_source(local(warn_source), target_for(target_db), allow_private=True)
    dump = pg.make_dump(warn_source, "custom", tmp_path / "warn.dump")
    check_upload_head(str(dump), os.path.getsize(dump), target_for(target_db), TOOLS)
    assert (pg.schema_dump(warn_source), pg.row_counts(warn_source), pg.schema_dump(target_db)) == before
    assert pg.admin("SELECT count(*) FROM pg_largeobject_metadata", dbname=warn_source) == lo_before


# -- uploads ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chinook_dumps(corpus_source, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("preflight-dumps")
    source = corpus_source("chinook")
    return {
        fmt: str(pg.make_dump(source, fmt, folder / f"chinook.{fmt}"))
        for fmt in ("custom", "tar", "plain", "gzip-plain")
    }


def pg_dump_version() -> str:
    out = subprocess.run(
        [TOOLS.bin_dir + "/pg_dump", "--version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().removeprefix("pg_dump (PostgreSQL) ")


FORMATS = {
    "custom": "a pg_dump custom-format archive (-Fc), archive format 1.14.0",
    "tar": "a pg_dump tar archive (-Ft), archive format 1.14.0",
    "plain": "a plain SQL script (-Fp)",
    "gzip-plain": "a gzip-compressed plain SQL script",
}


def upload_ok(fmt: str, path: str, *, limit: int = 10 * GiB) -> dict[str, tuple[str, str]]:
    size = os.path.getsize(path)
    made = f"a dump of PostgreSQL {short(local_version())} made by pg_dump {short(pg_dump_version())}"
    version = (
        f"{made} (archive format 1.14.0) can be read by PostgreSQL 15's pg_restore"
        if fmt in ("custom", "tar")
        else f"{made} can be restored into PostgreSQL 15"
    )
    shown = f"{size / 1024:.1f} KiB" if size < 1024 * 1024 else mib(size)
    return {
        "upload_not_empty": ("pass", f"the upload holds {shown} ({size} bytes)"),
        "dump_format_recognized": (
            "pass",
            f"the upload is {FORMATS[fmt]}, made by pg_dump {pg_dump_version()}, from PostgreSQL {local_version()}",
        ),
        "source_version_compatible": ("pass", version),
        "source_size_within_plan": (
            "pass",
            f"the upload uses {shown} of the project's {limit / GiB:.1f} GiB storage limit ({100 * size // limit} %)",
        ),
        "extensions_available_on_target": ("pass", "the dump uses no extensions besides plpgsql"),
        "target_database_empty": ("pass", "the project's database is empty"),
        **CLEAN_OBJECTS,
        "dump_read_in_full": ("pass", "preflight read the whole upload"),
        "schema_rehearsal": NOT_REHEARSED,
    }


def archive_head_read(head_bytes: int, path: str) -> tuple[str, str]:
    return (
        "pass",
        f"preflight read the first {head_bytes / 1024:.1f} KiB of the {os.path.getsize(path) / 1024:.1f} KiB upload, "
        "which holds the archive's whole table of contents; the import reads it whole",
    )


@pytest.mark.parametrize("fmt", ["custom", "tar", "plain", "gzip-plain"])
def test_every_dump_format_passes(chinook_dumps, target_db, fmt):
    path = chinook_dumps[fmt]
    report = check_upload_head(path, os.path.getsize(path), target_for(target_db), TOOLS)
    assert [check.name for check in report.checks] == list(UPLOAD_CHECKS)
    assert checks_of(report) == upload_ok(fmt, path)
    assert report.source["format"] == fmt
    assert report.source["table_count"] == 11
    assert report.source["dumped_from"] == local_version()
    assert report.source["upload_bytes"] == os.path.getsize(path)
    assert report.ok


@pytest.mark.parametrize("fmt", ["custom", "tar", "plain", "gzip-plain"])
def test_dump_warnings_and_extensions_come_from_its_contents(warn_source, target_db, tmp_path, fmt):
    path = str(pg.make_dump(warn_source, fmt, tmp_path / f"warn.{fmt}"))
    report = check_upload_head(path, os.path.getsize(path), target_for(target_db), TOOLS)
    checks = checks_of(report)
    assert checks["extensions_available_on_target"] == (
        "fail",
        f"the dump uses extensions CapyDB does not allow: cube (allowed: {ALLOWED}). Drop them from the "
        "source (DROP EXTENSION) and import again",
    )
    assert {name: checks[name] for name in OBJECT_WARNINGS} == OBJECT_WARNINGS
    assert report.source["extensions"] == [
        {"name": "citext", "version": None},
        {"name": "cube", "version": None},
    ]
    assert report.source["large_objects"] == 2


@pytest.fixture(scope="module")
def newer_dumps(newer, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("newer-dumps")
    dumps = {}
    for fmt, flag in (("custom", "--format=custom"), ("plain", "--format=plain")):
        path = str(folder / f"plain18.{fmt}")
        subprocess.run(
            [newer_tool("pg_dump"), flag, f"--file={path}", "-d", newer.url("plain18")],
            check=True,
            capture_output=True,
        )
        dumps[fmt] = path
    return dumps


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_dump_from_a_newer_postgres_fails_the_version_check(newer_dumps, target_db, fmt):
    path = newer_dumps[fmt]
    report = check_upload_head(path, os.path.getsize(path), target_for(target_db), TOOLS)
    checks = checks_of(report)
    version = report.source["dumped_from"]
    assert short(version).startswith(f"{NEWER_MAJOR}.")
    assert checks["dump_format_recognized"][0] == "pass"
    assert checks["source_version_compatible"] == (
        "fail",
        f"the dump comes from a PostgreSQL {NEWER_MAJOR} database, newer than the project's PostgreSQL 15; "
        f"imports cannot downgrade. Use a project on PostgreSQL {NEWER_MAJOR} or later",
    )
    blocked = "not checked: the dump cannot be restored into PostgreSQL 15 (see source_version_compatible)"
    assert checks["extensions_available_on_target"] == ("warn", blocked)
    assert checks["no_event_triggers"] == ("warn", blocked)
    assert checks["target_database_empty"] == ("pass", "the project's database is empty")


def test_an_archive_the_target_pg_restore_cannot_read_fails(chinook_dumps, target_db, tmp_path):
    data = bytearray(Path(chinook_dumps["custom"]).read_bytes())
    data[6] = 16  # archive format 1.16, as written by pg_dump 17 and later
    path = tmp_path / "new-format.dump"
    path.write_bytes(bytes(data))
    report = check_upload_head(str(path), len(data), target_for(target_db), TOOLS)
    assert checks_of(report)["source_version_compatible"] == (
        "fail",
        "the dump (archive format 1.16.0) was made by a newer pg_dump, which PostgreSQL 15's "
        "pg_restore cannot read; dump the database again with pg_dump 15 (package postgresql-client-15)",
    )
    assert checks_of(report)["extensions_available_on_target"] == (
        "warn",
        "not checked: PostgreSQL 15's pg_restore cannot read the dump (see source_version_compatible)",
    )


def test_a_head_holding_the_table_of_contents_is_enough(chinook_dumps, target_db, tmp_path):
    whole = chinook_dumps["custom"]
    size = os.path.getsize(whole)
    head = tmp_path / "head"
    head.write_bytes(Path(whole).read_bytes()[: 64 * 1024])
    assert size > 64 * 1024
    report = check_upload_head(str(head), size, target_for(target_db), TOOLS)
    assert checks_of(report) == upload_ok("custom", whole) | {
        "dump_read_in_full": archive_head_read(64 * 1024, whole)
    }
    assert report.source["table_count"] == 11


@pytest.mark.parametrize("fmt", ["plain", "gzip-plain"])
def test_the_head_of_a_plain_dump_says_how_much_was_read(chinook_dumps, target_db, tmp_path, fmt):
    whole = chinook_dumps[fmt]
    head = tmp_path / "head"
    head.write_bytes(Path(whole).read_bytes()[: 20 * 1024])
    report = check_upload_head(str(head), os.path.getsize(whole), target_for(target_db), TOOLS)
    checks = checks_of(report)
    expected = upload_ok(fmt, whole)
    assert checks["dump_format_recognized"] == expected["dump_format_recognized"]
    assert checks["source_version_compatible"] == expected["source_version_compatible"]
    assert checks["extensions_available_on_target"] == (
        "pass",
        "the first 20.0 KiB of the dump uses no extensions besides plpgsql",
    )
    assert {name: checks[name] for name in CLEAN_OBJECTS} == {
        name: (status, f"{detail} in the first 20.0 KiB of the upload")
        for name, (status, detail) in CLEAN_OBJECTS.items()
    }
    assert checks["dump_read_in_full"][0] == "warn"
    assert checks["dump_read_in_full"][1].startswith("preflight read the first ")
    assert checks["dump_read_in_full"][1].endswith("; the import reads it whole and checks what comes after")
    assert report.ok


def test_a_table_of_contents_beyond_the_head_warns_and_a_cut_file_fails(chinook_dumps, target_db, tmp_path):
    whole = chinook_dumps["custom"]
    size = os.path.getsize(whole)
    head = tmp_path / "head"
    head.write_bytes(Path(whole).read_bytes()[:4096])
    report = check_upload_head(str(head), size, target_for(target_db), TOOLS)
    checks = checks_of(report)
    assert checks["source_version_compatible"] == (
        "warn",
        "the dump's table of contents is larger than the first 4.0 KiB that preflight reads; the import "
        "reads it whole before restoring anything",
    )
    assert checks["extensions_available_on_target"] == (
        "warn",
        "not checked: the dump's table of contents is not in the part preflight reads (see source_version_compatible)",
    )
    assert report.ok
    # The same 4 KiB as the whole upload: a truncated file, not a head.
    truncated = check_upload_head(str(head), 4096, target_for(target_db), TOOLS)
    assert checks_of(truncated)["dump_format_recognized"] == (
        "fail",
        "the custom-format archive (-Fc) is incomplete: it ends inside its table of contents; "
        "the file is cut short: upload it again (the whole file pg_dump wrote)",
    )


def test_an_upload_that_is_not_a_dump_fails_format_recognition(target_db, tmp_path):
    path = tmp_path / "archive.zip"
    path.write_bytes(b"PK\x03\x04" + secrets.token_bytes(200))
    report = check_upload_head(str(path), 204, target_for(target_db), TOOLS)
    blocked = "not checked: the upload is not a pg_dump output (see dump_format_recognized)"
    assert checks_of(report) == {
        "upload_not_empty": ("pass", "the upload holds 204 bytes"),
        "dump_format_recognized": (
            "fail",
            "the upload is a zip archive, not a pg_dump output; upload a file made by pg_dump -Fc, -Ft or plain SQL",
        ),
        "source_version_compatible": ("warn", blocked),
        "source_size_within_plan": (
            "pass",
            "the upload uses 204 bytes of the project's 10.0 GiB storage limit (0 %)",
        ),
        "extensions_available_on_target": ("warn", blocked),
        "target_database_empty": ("pass", "the project's database is empty"),
        **{name: ("warn", blocked) for name in CLEAN_OBJECTS},
        "dump_read_in_full": ("warn", blocked),
        "schema_rehearsal": ("warn", blocked),
    }


def test_an_empty_upload_fails(target_db, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    report = check_upload_head(str(path), 0, target_for(target_db), TOOLS)
    checks = checks_of(report)
    assert checks["upload_not_empty"] == (
        "fail",
        "the uploaded object is empty; upload the pg_dump output again",
    )
    assert checks["dump_format_recognized"] == ("warn", "not checked: the upload is empty")
    assert checks["extensions_available_on_target"] == ("warn", "not checked: the upload is empty")


def test_an_upload_over_the_storage_limit_fails_and_near_it_warns(chinook_dumps, target_db):
    path = chinook_dumps["custom"]
    size = os.path.getsize(path)
    shown = f"{size / 1024:.1f} KiB"
    over = checks_of(check_upload_head(path, size, target_for(target_db, limit=100_000), TOOLS))
    assert over["source_size_within_plan"] == (
        "fail",
        f"the upload is {shown} of the project's 97.7 KiB storage limit ({size} > 100000 bytes); raise the "
        "project's storage limit or import less data",
    )
    near_limit = size * 100 // 85
    near = checks_of(check_upload_head(path, size, target_for(target_db, limit=near_limit), TOOLS))
    assert near["source_size_within_plan"] == (
        "warn",
        f"the upload uses {shown} of the project's {near_limit / 1024:.1f} KiB storage limit "
        f"({100 * size // near_limit} %), over 80 %; the imported database leaves little room to grow",
    )


def test_a_non_empty_target_fails_an_upload_unless_recreate(chinook_dumps, target_db):
    pg.psql(target_db, text="CREATE TABLE existing (id int);")
    path = chinook_dumps["plain"]
    report = check_upload_head(path, os.path.getsize(path), target_for(target_db), TOOLS)
    assert checks_of(report)["target_database_empty"][0] == "fail"
    replacing = check_upload_head(path, os.path.getsize(path), target_for(target_db, recreate=True), TOOLS)
    assert replacing.ok


# -- the head of an upload, from real storage -----------------------------------------------


def test_storage_head_reads_a_prefix_and_preflight_judges_it(store, chinook_dumps, target_db, tmp_path):
    key = new_object_key("prj_preflight", secrets.token_hex(8))
    whole = chinook_dumps["custom"]
    store.put_file(key, whole)
    try:
        stat_before = store.client.stat_object(store.bucket, key)
        head = tmp_path / "head"
        assert store.head(key, head, 64 * 1024) == 64 * 1024
        assert head.read_bytes() == Path(whole).read_bytes()[: 64 * 1024]
        report = check_upload_head(str(head), store.size(key), target_for(target_db), TOOLS)
        assert checks_of(report) == upload_ok("custom", whole) | {
            "dump_read_in_full": archive_head_read(64 * 1024, whole)
        }
        # Longer than the object: all of it.
        assert store.head(key, tmp_path / "all", 1024**3) == os.path.getsize(whole)
        assert (tmp_path / "all").read_bytes() == Path(whole).read_bytes()
        stat_after = store.client.stat_object(store.bucket, key)
        assert (stat_after.etag, stat_after.size, stat_after.last_modified) == (
            stat_before.etag,
            stat_before.size,
            stat_before.last_modified,
        )
    finally:
        store.delete(key)


def test_storage_head_of_an_empty_or_missing_object(store, tmp_path):
    key = new_object_key("prj_preflight", secrets.token_hex(8))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    store.put_file(key, empty)
    try:
        assert store.head(key, tmp_path / "head", 1024) == 0
        assert (tmp_path / "head").read_bytes() == b""
    finally:
        store.delete(key)
    with pytest.raises(ObjectMissing):
        store.head(key, tmp_path / "missing", 1024)
    assert not (tmp_path / "missing").exists()
