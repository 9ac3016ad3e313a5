import pytest

from stages.errors import PermanentCommandFailure, PermanentError, TransientCommandFailure
from stages.tools import commands
from stages.tools.commands import CommandResult, PgDump, PgRestore, PgTools, Psql, is_transient


def test_pg_dump_schema_arguments():
    args = PgDump("/bin").schema_args(
        "host='h' dbname='d'",
        "/w/schema.dump",
        snapshot="0003-1",
        lock_wait_ms=60000,
        exclude_data=['"public"."t"'],
    )
    assert args == [
        "--format=custom",
        "--compress=0",
        "--encoding=UTF8",
        "--no-blobs",
        "--file=/w/schema.dump",
        "--no-password",
        "--lock-wait-timeout=60000",
        "--snapshot=0003-1",
        '--exclude-table-data="public"."t"',
        "--dbname=host='h' dbname='d'",
    ]


def test_pg_restore_arguments_do_not_replay_owners_or_grants():
    args = PgRestore("/bin").restore_args("/w/dump", "dbname='p'", jobs=0)
    assert args == [
        "--dbname=dbname='p'",
        "--no-owner",
        "--no-privileges",
        "--no-tablespaces",
        "--exit-on-error",
        "--jobs=1",
        "--no-password",
        "/w/dump",
    ]


def test_psql_stops_on_first_error_and_ignores_psqlrc():
    args = Psql("/bin").script_args("dbname='p'", "/w/dump.sql", restrict_file="/w/dump.sql.restrict")
    assert "--set=ON_ERROR_STOP=1" in args and "--no-psqlrc" in args
    # The restrict key is read from a file first, never passed as an argument.
    assert args[-2:] == ["--file=/w/dump.sql.restrict", "--file=/w/dump.sql"]
    assert not any("restrict " in arg for arg in args)


def test_tools_for_a_missing_major_say_what_to_install(tmp_path):
    with pytest.raises(PermanentError, match="install postgresql-client-99"):
        PgTools.for_major(99, str(tmp_path / "{major}" / "bin"))


@pytest.mark.parametrize(
    ("stderr", "transient"),
    [
        ('pg_dump: error: connection to server at "h" failed: Connection timed out\ntimeout expired', True),
        ("pg_dump: error: server closed the connection unexpectedly", True),
        ('FATAL:  password authentication failed for user "u"', False),
        ("pg_restore: error: input file appears to be a text format dump", False),
        ("pg_restore: error: could not execute query: ERROR:  syntax error", False),
    ],
)
def test_failure_classification(stderr, transient):
    assert is_transient(stderr) is transient


def test_failure_names_the_last_error_line():
    result = CommandResult(
        1, "", "pg_restore: connecting\npg_restore: error: could not read input file: end of file\n"
    )
    err = PgRestore("/bin").failure(result, "pg_restore into the preview database")
    assert isinstance(err, PermanentCommandFailure)
    assert (
        err.message
        == "pg_restore into the preview database failed (exit code 1): pg_restore: error: could not read input file: end of file"
    )
    assert err.exit_code == 1
    flaky = PgDump("/bin").failure(
        CommandResult(1, "", "pg_dump: error: server closed the connection unexpectedly"), "pg_dump"
    )
    assert isinstance(flaky, TransientCommandFailure)


def test_command_output_is_redacted(tmp_path):
    script = tmp_path / "psql"
    script.write_text("#!/bin/sh\necho 'connecting to postgres://u:hunter22@h/db' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(PermanentCommandFailure) as info:
        Psql(str(tmp_path)).run(["x"], secrets=["hunter22"])
    assert info.value.exit_code == 3
    assert "hunter22" not in info.value.stderr_tail
    assert "hunter22" not in info.value.message


# -- classification by whose server it was ---------------------------------------------


def test_a_source_refusing_connections_is_transient_until_it_keeps_refusing():
    stderr = 'pg_dump: error: connection to server at "203.0.113.7", port 5432 failed: Connection refused'
    failure = commands.classify_failure(
        CommandResult(1, "", stderr), "pg_dump of the source", commands.SOURCE
    )
    assert isinstance(failure, TransientCommandFailure)
    assert failure.when_repeated == (
        f"the source database kept refusing connections ({stderr}); "
        "check the host and port and that the database is running"
    )


def test_our_cluster_lost_is_transient_and_never_named():
    lost = (
        'pg_restore: error: connection to server at "10.0.0.5", port 5432 failed: FATAL:  password '
        'authentication failed for user "capy_restore_x"'
    )
    failure = commands.classify_failure(
        CommandResult(1, "", lost), "pg_restore into the preview database", commands.CLUSTER
    )
    assert isinstance(failure, TransientCommandFailure) and failure.when_repeated is None
    assert failure.message == (
        "pg_restore into the preview database failed (exit code 1): the project's database cluster is "
        "unavailable; it will be retried"
    )
    # What the dump itself got wrong stays permanent, with no address either.
    bad = 'pg_restore: error: could not execute query: ERROR:  relation "t" does not exist'
    failure = commands.classify_failure(
        CommandResult(1, "", bad), "pg_restore into the preview database", commands.CLUSTER
    )
    assert isinstance(failure, PermanentCommandFailure)


def test_a_tools_progress_lines_are_logged_at_debug_and_the_rest_at_info(tmp_path, caplog):
    """pg_restore --verbose prints a line per object (thousands for a large schema); at
    INFO each cost the worker more than the tool's own run. They stay in the tail."""
    script = tmp_path / "pg_restore"
    script.write_text(
        "#!/bin/sh\n"
        "echo 'pg_restore: connecting to database for restore' >&2\n"
        "echo 'pg_restore: creating TABLE \"public.t\"' >&2\n"
        "echo 'pg_restore: warning: errors ignored on restore: 1' >&2\n"
        "echo 'pg_restore: while PROCESSING TOC:' >&2\n"
        "echo 'pg_restore: from TOC entry 215; 1259 16390 TABLE t postgres' >&2\n"
        "echo 'pg_restore: error: could not execute query: ERROR:  boom' >&2\n"
        "echo 'pg_dump: dumping contents of table \"public.t\"' >&2\n"
        "echo 'pg_restore: processing item 7 TABLE t' >&2\n"
        "echo 'NOTICE:  something the server said' >&2\n"
        "exit 0\n"
    )
    script.chmod(0o755)
    with caplog.at_level("DEBUG", logger=commands.log.name):
        result = PgRestore(str(tmp_path)).run(["x"])
    levels = {
        record.getMessage(): record.levelname for record in caplog.records if record.name == commands.log.name
    }
    assert levels['pg_restore: creating TABLE "public.t"'] == "DEBUG"
    assert levels["pg_restore: connecting to database for restore"] == "DEBUG"
    assert levels["pg_restore: warning: errors ignored on restore: 1"] == "INFO"
    assert levels["pg_restore: error: could not execute query: ERROR:  boom"] == "INFO"
    assert levels["pg_restore: while PROCESSING TOC:"] == "INFO"
    assert levels["pg_restore: from TOC entry 215; 1259 16390 TABLE t postgres"] == "INFO"
    assert levels['pg_dump: dumping contents of table "public.t"'] == "DEBUG"
    assert levels["pg_restore: processing item 7 TABLE t"] == "DEBUG"
    assert levels["NOTICE:  something the server said"] == "INFO"
    assert 'pg_restore: creating TABLE "public.t"' in result.stderr_tail
