"""Preflight's pure logic: providers and pooler hosts, size thresholds, the extension
allowlist, dump contents, the report's shape, and the checks that need no socket."""

from __future__ import annotations

import gzip
import socket

import psycopg2
import pytest

from stages.connections.addresses import SourceHostUnresolvable, resolve
from stages.connections.connect import (
    PoolerRefusedStartupParameter,
    SourceAuthenticationFailed,
    SourceConnectionRefused,
    SourceTimedOut,
    explain_connect_error,
)
from stages.connections.pgurl import SourceURL
from stages.dumps.contents import read_sql, read_toc, sql_lines
from stages.dumps.toc import parse
from stages.errors import PermanentError
from stages.preflight import FAIL, LIVE_CHECKS, PASS, WARN, Findings, Preflight, Target
from stages.preflight.checks import add_object_warnings, check_extensions, check_major, check_size
from stages.preflight.extensions import DEFAULT_EXTENSION_ALLOWLIST, Extension, judge_extensions
from stages.preflight.live import check_live_source
from stages.preflight.providers import detect_provider

MiB = 1024 * 1024


def target(**changes) -> Target:
    values = {
        "major": 15,
        "storage_limit_bytes": 100 * MiB,
        "recreate": False,
        "is_empty": lambda: True,
        "version": "15.4",
        "available_extensions": lambda: {"citext": "1.6", "hstore": "1.8", "plpgsql": "1.0", "cube": "1.5"},
    }
    return Target(**(values | changes))


def details(report: Preflight) -> dict[str, tuple[str, str]]:
    return {check.name: (check.status, check.detail) for check in report.checks}


# -- providers and pooler host patterns ------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "user", "name"),
    [
        ("ep-cool-darkness-123456.us-east-2.aws.neon.tech", 5432, "alex", "neon"),
        ("db.abcdefghijklmnop.supabase.co", 5432, "postgres", "supabase"),
        ("aws-0-eu-central-1.pooler.supabase.com", 5432, "postgres.abcdefghijklmnop", "supabase"),
        ("mydb.c9akciq32.us-east-1.rds.amazonaws.com", 5432, "admin", "aws-rds"),
        ("ec2-54-83-1-2.compute-1.amazonaws.com", 5432, "u8f7a", "heroku"),
        ("ec2-3-250-1-2.eu-west-1.compute.amazonaws.com", 5432, "u3abc", "heroku"),
        ("ec2-3-250-1-2.eu-west-1.compute.amazonaws.com", 5432, "admin", "unknown"),
        ("my-instance.us-central1.sql.goog", 5432, "postgres", "google-cloudsql"),
        ("myserver.postgres.database.azure.com", 5432, "admin", "azure"),
        ("dpg-abc123-a.oregon-postgres.render.com", 5432, "app", "render"),
        ("roundhouse.proxy.rlwy.net", 40215, "postgres", "railway"),
        ("db-postgresql-nyc3-1234-do-user-1-0.b.db.ondigitalocean.com", 25060, "doadmin", "digitalocean"),
        ("DB.Example.COM.", 5432, "app", "unknown"),
    ],
)
def test_provider_is_told_from_the_host(host, port, user, name):
    assert detect_provider(host, port, user).name == name


@pytest.mark.parametrize(
    ("host", "port", "user", "pooler"),
    [
        (
            "ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech",
            5432,
            "alex",
            "ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech:5432 is Neon's connection pooler "
            "(PgBouncer in transaction mode: the host name ends in -pooler); use the direct connection "
            "string, host ep-cool-darkness-123456.us-east-2.aws.neon.tech",
        ),
        (
            "aws-0-eu-central-1.pooler.supabase.com",
            6543,
            "postgres.abcdefghijklmnop",
            "aws-0-eu-central-1.pooler.supabase.com:6543 is Supabase's transaction pooler (port 6543); "
            "use the direct connection, db.abcdefghijklmnop.supabase.co:5432, or the session pooler on port 5432",
        ),
        (
            "db.abcdefghijklmnop.supabase.co",
            6543,
            "postgres",
            "db.abcdefghijklmnop.supabase.co:6543 is Supabase's transaction pooler (port 6543); use the "
            "direct connection, db.abcdefghijklmnop.supabase.co:5432, or the session pooler on port 5432",
        ),
        (
            "db-pg-1-do-user-1-0.b.db.ondigitalocean.com",
            25061,
            "doadmin",
            "db-pg-1-do-user-1-0.b.db.ondigitalocean.com:25061 is a DigitalOcean connection pool "
            "(PgBouncer, port 25061); use the direct connection on port 25060",
        ),
        ("ep-cool-darkness-123456.us-east-2.aws.neon.tech", 5432, "alex", None),
        ("aws-0-eu-central-1.pooler.supabase.com", 5432, "postgres.abcdefghijklmnop", None),
        ("db.example.com", 6543, "app", None),
    ],
)
def test_transaction_pooler_hosts(host, port, user, pooler):
    assert detect_provider(host, port, user).pooler == pooler


# -- size thresholds -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "status", "detail"),
    [
        (10 * MiB, PASS, "the source database uses 10.0 MiB of the project's 100.0 MiB storage limit (10 %)"),
        (80 * MiB, PASS, "the source database uses 80.0 MiB of the project's 100.0 MiB storage limit (80 %)"),
        (
            80 * MiB + 1,
            WARN,
            "the source database uses 80.0 MiB of the project's 100.0 MiB storage limit (80 %), over 80 %; "
            "the imported database leaves little room to grow",
        ),
        (
            100 * MiB,
            WARN,
            "the source database uses 100.0 MiB of the project's 100.0 MiB storage limit (100 %), over 80 %; "
            "the imported database leaves little room to grow",
        ),
        (
            100 * MiB + 1,
            FAIL,
            "the source database is 100.0 MiB of the project's 100.0 MiB storage limit "
            "(104857601 > 104857600 bytes); raise the project's storage limit or import less data",
        ),
        (0, PASS, "the source database uses 0 bytes of the project's 100.0 MiB storage limit (0 %)"),
    ],
)
def test_size_thresholds(size, status, detail):
    report = Preflight()
    check_size(report, size, target(), "the source database")
    assert details(report) == {"source_size_within_plan": (status, detail)}


# -- versions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num", "label", "status", "detail"),
    [
        (150004, "15.4", PASS, "source PostgreSQL 15.4 can be restored into PostgreSQL 15"),
        (120019, "12.19", PASS, "source PostgreSQL 12.19 can be restored into PostgreSQL 15"),
        (90624, "9.6.24", PASS, "source PostgreSQL 9.6.24 can be restored into PostgreSQL 15"),
        (
            160002,
            "16.2",
            FAIL,
            "the source runs PostgreSQL 16.2, newer than the project's PostgreSQL 15; imports cannot "
            "downgrade. Use a project on a cluster running PostgreSQL 16 or later",
        ),
        (
            90124,
            "9.1.24",
            FAIL,
            "the source runs PostgreSQL 9.1.24; pg_dump 15 dumps PostgreSQL 9.2 and later only. "
            "Upgrade the source first",
        ),
    ],
)
def test_source_version(num, label, status, detail):
    report = Preflight()
    check_major(report, num, target(), label=label)
    assert details(report) == {"source_version_compatible": (status, detail)}


# -- extensions ------------------------------------------------------------------------

ALLOWED = (
    "btree_gin, btree_gist, citext, fuzzystrmatch, hstore, ltree, pg_stat_statements, pg_trgm, "
    "pgcrypto, plpgsql, postgis, unaccent, uuid-ossp, vector"
)


def test_every_extension_outside_the_allowlist_is_named():
    verdict = judge_extensions(
        [
            Extension("plpgsql", "1.0"),
            Extension("seg", "1.4"),
            Extension("cube", "1.5"),
            Extension("citext", "1.6"),
        ],
        DEFAULT_EXTENSION_ALLOWLIST,
        {"citext": "1.6", "cube": "1.5", "seg": "1.4"},
    )
    assert verdict.failed
    assert verdict.detail("the source database") == (
        "the source database uses extensions CapyDB does not allow: cube 1.5, seg 1.4 "
        f"(allowed: {ALLOWED}). Drop them from the source (DROP EXTENSION) and import again"
    )


def test_allowlisted_but_not_installable_on_the_target_fails():
    verdict = judge_extensions(
        [Extension("vector", "0.8.0"), Extension("postgis", "3.4.2"), Extension("cube", "1.5")],
        DEFAULT_EXTENSION_ALLOWLIST,
        {"cube": "1.5"},
    )
    assert verdict.detail("the source database") == (
        "the source database uses extensions CapyDB does not allow: cube 1.5 "
        f"(allowed: {ALLOWED}); it also uses allowed extensions that the project's cluster cannot "
        "install: postgis 3.4.2, vector 0.8.0. Drop them from the source (DROP EXTENSION) and import again"
    )


def test_an_older_version_on_the_target_warns():
    report = Preflight()
    check_extensions(
        report, [Extension("citext", "1.8"), Extension("hstore", "1.8")], target(), "the source database"
    )
    assert details(report) == {
        "extensions_available_on_target": (
            WARN,
            "the project's cluster has older versions of: citext (source 1.8, project 1.6); the restore "
            "creates the project's version, so objects that need the newer one may fail to restore",
        )
    }


def test_allowed_and_available_extensions_pass_and_plpgsql_is_always_allowed():
    verdict = judge_extensions(
        [Extension("plpgsql", "1.0"), Extension("citext", "1.6")], ("citext",), {"citext": "1.6"}
    )
    assert not verdict.failed and not verdict.older_on_target
    assert verdict.detail("the source database") == (
        "the source database uses citext 1.6: all allowed and available on the project's cluster"
    )
    only_plpgsql = judge_extensions([Extension("plpgsql", "1.0")], (), {})
    assert only_plpgsql.detail("the dump") == "the dump uses no extensions besides plpgsql"


def test_a_configured_allowlist_replaces_the_default():
    verdict = judge_extensions([Extension("cube", "1.5"), Extension("citext", "1.6")], ("cube",), None)
    assert [ext.name for ext in verdict.not_allowed] == ["citext"]
    assert not verdict.availability_checked


def test_unknown_target_extensions_check_the_allowlist_only():
    verdict = judge_extensions([Extension("citext", "1.8")], DEFAULT_EXTENSION_ALLOWLIST, None)
    assert verdict.detail("the dump") == (
        "the dump uses citext 1.8: all allowed (the project's cluster was not asked)"
    )


def test_versions_that_are_not_numbers_are_not_compared():
    verdict = judge_extensions([Extension("citext", "1.8beta")], ("citext",), {"citext": "1.6"})
    assert verdict.older_on_target == ()


# -- objects a managed target cannot restore -----------------------------------------------


def test_object_warnings_name_what_was_found():
    report = Preflight()
    add_object_warnings(
        report,
        Findings(
            event_triggers=["audit_ddl"],
            untrusted_languages=["plperlu"],
            large_objects=3,
            foreign_servers=["legacy"],
            publications=["pub"],
            subscriptions=[],
        ),
    )
    assert details(report) == {
        "no_event_triggers": (
            WARN,
            "event triggers audit_ddl: creating them needs superuser, which a managed database does not "
            "grant, so the import leaves them out; recreate what they do another way after the import",
        ),
        "no_untrusted_languages": (
            WARN,
            "untrusted procedural languages plperlu: creating them needs superuser, which a managed database "
            "does not grant, so the import leaves them out and functions written in them cannot be restored; "
            "rewrite those functions in a trusted language such as plpgsql",
        ),
        "no_large_objects": (
            WARN,
            "3 large objects: they are restored one by one, which is slow when there are many, and their data "
            "counts towards the storage limit",
        ),
        "no_foreign_servers": (
            WARN,
            "foreign servers legacy: they point at data outside this database; the import leaves out user "
            "mappings (they hold the source's credentials) and foreign-data wrappers that need superuser",
        ),
        "no_logical_replication": (
            WARN,
            "publications pub: logical replication is not carried over; the import leaves out subscriptions "
            "(they need superuser), and publications have no subscribers after it",
        ),
    }


def test_objects_that_could_not_be_read_are_not_checked():
    report = Preflight()
    add_object_warnings(
        report,
        Findings(
            event_triggers=[],
            untrusted_languages=[],
            large_objects=0,
            errors={"subscriptions": "permission denied for table pg_subscription"},
        ),
    )
    assert details(report) == {
        "no_event_triggers": (PASS, "no event triggers"),
        "no_untrusted_languages": (PASS, "no untrusted procedural languages"),
        "no_large_objects": (PASS, "no large objects"),
        "no_foreign_servers": (WARN, "not checked: the source's catalog could not be read for it"),
        "no_logical_replication": (
            WARN,
            "not checked: the source's catalog could not be read for it (permission denied for table pg_subscription)",
        ),
    }


# -- the report ------------------------------------------------------------------------


def test_response_shape_and_ok():
    report = Preflight()
    report.add("a", PASS, "fine")
    report.add("b", WARN, "hm")
    report.source.update(database_size_bytes=1, server_version="15.4", extensions=[])
    assert report.as_response(target()) == {
        "checks": [
            {"name": "a", "status": "pass", "detail": "fine"},
            {"name": "b", "status": "warn", "detail": "hm"},
        ],
        "ok": True,
        "source": {"database_size_bytes": 1, "server_version": "15.4", "extensions": []},
        "storage_limit_bytes": 100 * MiB,
        "target_version": "15.4",
    }
    report.add("c", FAIL, "broken")
    report.add("d", FAIL, "also broken")
    assert report.as_response(target(version=""))["ok"] is False
    assert report.as_response(target(version=""))["target_version"] == "15"
    with pytest.raises(PermanentError) as info:
        report.raise_for_failure()
    assert info.value.message == "preflight check c failed: broken"


# -- live checks that need no socket ---------------------------------------------------------


def test_private_address_refused_before_any_connection():
    source = SourceURL.parse("postgres://app:pw@db.internal.example/app")
    report = check_live_source(
        source, target(), allow_private=False, resolver=lambda host, port: ["10.1.2.3"]
    )
    blocked = "not checked: the source address is not allowed (see source_address_allowed)"
    assert [check.name for check in report.checks] == list(LIVE_CHECKS)
    assert details(report) == {
        "source_address_allowed": (
            FAIL,
            "the source host 'db.internal.example' resolves to 10.1.2.3, a private address (10.0.0.0/8, RFC 1918); "
            "imports connect only to publicly reachable databases. Use the database's public host name "
            "(an operator can allow private sources with CAPY_ALLOW_PRIVATE_SOURCES=true)",
        ),
        "source_reachable": (WARN, blocked),
        "not_a_transaction_pooler": (
            WARN,
            "not checked: db.internal.example:5432 is not a known pooler address, but the source "
            "address is not allowed (see source_address_allowed)",
        ),
        "source_version_compatible": (WARN, blocked),
        "source_size_within_plan": (WARN, blocked),
        "extensions_available_on_target": (WARN, blocked),
        "target_database_empty": (PASS, "the project's database is empty"),
        "no_event_triggers": (WARN, blocked),
        "no_untrusted_languages": (WARN, blocked),
        "no_large_objects": (WARN, blocked),
        "no_foreign_servers": (WARN, blocked),
        "no_logical_replication": (WARN, blocked),
        "schema_rehearsal": (WARN, blocked),
    }
    assert report.pinned is None and not report.ok
    assert report.source == {
        "database_size_bytes": None,
        "server_version": None,
        "extensions": [],
        "provider": "unknown",
    }
    with pytest.raises(PermanentError, match="preflight check source_address_allowed failed"):
        report.raise_for_failure()


def test_metadata_address_is_refused():
    source = SourceURL.parse("postgres://app@metadata.example/app")
    report = check_live_source(
        source, target(), allow_private=False, resolver=lambda h, p: ["169.254.169.254"]
    )
    assert details(report)["source_address_allowed"][1].startswith(
        "the source host 'metadata.example' resolves to 169.254.169.254, a cloud metadata address (AWS, GCP, "
        "Azure, OpenStack instance metadata; in 169.254.0.0/16, link-local);"
    )


def test_unresolvable_host_is_a_reachability_failure():
    def no_such_name(host, port, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    source = SourceURL.parse("postgres://app@db.nowhere.example/app")
    report = check_live_source(
        source,
        target(),
        allow_private=False,
        resolver=lambda host, port: resolve(host, port, getaddrinfo=no_such_name),
    )
    checks = details(report)
    assert checks["source_address_allowed"] == (
        WARN,
        "not checked: the source host does not resolve (see source_reachable)",
    )
    assert checks["source_reachable"] == (
        FAIL,
        "the source host 'db.nowhere.example' does not resolve (Name or service not known); check the host name",
    )
    assert checks["source_version_compatible"] == (
        WARN,
        "not checked: the source database could not be reached (see source_reachable)",
    )
    with pytest.raises(PermanentError, match="preflight check source_reachable failed: the source host"):
        report.raise_for_failure()


def test_resolve_keeps_each_address_once_in_order():
    def lookup(host, port, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::7", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port)),
        ]

    assert resolve("db.example.com", 5432, getaddrinfo=lookup) == ["203.0.113.7", "2001:db8::7"]
    with pytest.raises(SourceHostUnresolvable):
        resolve("x", 1, getaddrinfo=lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-2, "nope")))


def test_pooler_host_fails_even_when_the_address_is_refused():
    source = SourceURL.parse("postgres://alex@ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech/neondb")
    report = check_live_source(source, target(), allow_private=False, resolver=lambda h, p: ["10.0.0.1"])
    assert details(report)["not_a_transaction_pooler"] == (
        FAIL,
        "ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech:5432 is Neon's connection pooler (PgBouncer "
        "in transaction mode: the host name ends in -pooler); use the direct connection string, host "
        "ep-cool-darkness-123456.us-east-2.aws.neon.tech: pg_dump needs one session for its consistent snapshot",
    )
    assert report.source["provider"] == "neon"


def test_sslmode_require_is_added_unless_the_url_sets_it():
    assert SourceURL.parse("postgres://a@h.example/d").params["sslmode"] == "require"
    assert SourceURL.parse("postgres://a@h.example/d?sslmode=verify-full").params["sslmode"] == "verify-full"


# -- connection errors are told apart ------------------------------------------------------


@pytest.mark.parametrize(
    ("libpq", "cls", "message"),
    [
        (
            'connection to server at "203.0.113.7", port 5432 failed: FATAL:  password authentication failed for user "app"',
            SourceAuthenticationFailed,
            "the source database at db.example.com:5432 refused the login for user 'app': password "
            "authentication failed; check the user name and password",
        ),
        (
            'connection to server at "203.0.113.7", port 5432 failed: timeout expired',
            SourceTimedOut,
            "the source database at db.example.com:5432 did not answer within the 10 s connect timeout; "
            "check the host, port and firewall",
        ),
        (
            'connection to server at "203.0.113.7", port 5432 failed: Connection refused\n\tIs the server running',
            SourceConnectionRefused,
            "the source database at db.example.com:5432 refused the connection (connection refused): nothing "
            "accepts connections there, or the server is restarting; check the host and port and that the "
            "database is running",
        ),
        (
            "connection to server failed: FATAL:  unsupported startup parameter: options",
            PoolerRefusedStartupParameter,
            "the source database at db.example.com:5432 is a connection pooler that refused a startup "
            "parameter (connection to server failed: FATAL:  unsupported startup parameter: options)",
        ),
    ],
)
def test_connection_errors_are_told_apart(libpq, cls, message):
    source = SourceURL.parse("postgres://app:secret@db.example.com/app")
    err = explain_connect_error(psycopg2.OperationalError(libpq), source, "source database", timeout=10)
    assert type(err) is cls
    assert str(err) == message


# -- what a dump contains ----------------------------------------------------------------

# Entries without an owner end in a space, as pg_restore prints them.
LISTING = "\n".join(
    [
        ";",
        "; Archive created at 2026-11-28 08:01:26 UTC",
        ";     Dump Version: 1.14-0",
        ";",
        "315; 1255 68836 FUNCTION public capy_plsample_handler() postgres",
        "940; 2612 68837 PROCEDURAL LANGUAGE - plsampleu postgres",
        "941; 2612 68838 PROCEDURAL LANGUAGE - plperl postgres",
        "6; 2615 2200 SCHEMA - sales postgres",
        "2; 3079 68630 EXTENSION - citext ",
        "3517; 0 0 COMMENT - EXTENSION citext ",
        "3; 3079 68735 EXTENSION - plpython3u ",
        "2187; 1417 68841 SERVER - capy_elsewhere postgres",
        "216; 1259 68824 TABLE public t postgres",
        "217; 1259 68831 TABLE sales my table postgres",
        "3508; 2613 68838 BLOB - 68838 postgres",
        "3509; 2613 68839 BLOB - 68839 postgres",
        "3506; 0 68824 TABLE DATA public t postgres",
        "3510; 0 0 BLOBS - BLOBS ",
        "3503; 6104 68842 PUBLICATION - capy_pub postgres",
        "3504; 6106 68843 PUBLICATION TABLE public capy_pub t postgres",
        "3505; 6100 68844 SUBSCRIPTION - capy_sub postgres",
        "3358; 3466 68835 EVENT TRIGGER - capy_audit_ddl postgres",
    ]
)


def test_archive_listing_is_read_for_what_matters():
    contents = read_toc(parse(LISTING))
    assert contents.extensions == ["citext", "plpython3u"]
    assert contents.schemas == ["sales"]
    assert contents.table_count == 2
    assert contents.large_objects == 2
    assert contents.event_triggers == ["capy_audit_ddl"]
    assert contents.languages == ["plsampleu", "plperl"]
    assert contents.untrusted_languages == ["plpython3u", "plsampleu"]
    assert contents.foreign_servers == ["capy_elsewhere"]
    assert contents.publications == ["capy_pub"]
    assert contents.subscriptions == ["capy_sub"]


def test_plain_sql_is_read_from_comments_and_statements():
    script = [
        "-- Name: sales; Type: SCHEMA; Schema: -; Owner: postgres",
        "CREATE SCHEMA sales;",
        "-- Name: citext; Type: EXTENSION; Schema: -; Owner: -",
        "CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA public;",
        'create extension "uuid-ossp";',
        "CREATE EXTENSION seg;",
        "CREATE TRUSTED LANGUAGE plmine HANDLER h;",
        "CREATE LANGUAGE plsampleu HANDLER h;",
        "-- Name: t; Type: TABLE; Schema: public; Owner: postgres",
        "-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres",
        "-- Name: 16400; Type: BLOB; Schema: -; Owner: postgres",
        "-- Name: audit; Type: EVENT TRIGGER; Schema: -; Owner: postgres",
    ]
    contents = read_sql(script, complete=False)
    assert contents.extensions == ["citext", "uuid-ossp", "seg"]
    assert contents.schemas == ["sales"]
    assert contents.table_count == 1
    assert contents.large_objects == 1
    assert contents.event_triggers == ["audit"]
    assert contents.untrusted_languages == ["plmine", "plsampleu"]
    assert contents.complete is False


def test_sql_lines_read_a_gzip_stream_cut_short(tmp_path):
    text = "".join(f"-- line {n}\n" for n in range(20000)).encode()
    data = gzip.compress(text)
    head = tmp_path / "head.gz"
    head.write_bytes(data[: len(data) // 2])
    lines = list(sql_lines(str(head), gzipped=True))
    assert 0 < len(lines) < 20000
    assert lines[0] == "-- line 0"
    whole = tmp_path / "whole.gz"
    whole.write_bytes(data)
    assert len(list(sql_lines(str(whole), gzipped=True))) == 20000
    assert len(list(sql_lines(str(whole), gzipped=True, max_text=1000))) < 100
