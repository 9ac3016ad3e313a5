"""The first real error of a tool's stderr, as a failed job names it."""

from stages.tools.commands import CLUSTER, CommandResult, classify_failure, first_error


def test_the_first_server_error_wins_over_the_noise_after_it():
    stderr = (
        "pg_restore: error: could not execute query: ERROR:  function f() does not exist\n"
        "LINE 1: SELECT f();\n"
        "HINT:  No function matches the given name and argument types.\n"
        "Command was: CREATE VIEW v AS SELECT f();\n"
        'pg_restore: error: could not execute query: ERROR:  relation "v" does not exist\n'
        "pg_restore: error: a worker process died unexpectedly\n"
        "pg_restore: warning: errors ignored on restore: 2\n"
    )
    error = first_error(stderr)
    assert (error.text, error.statement, error.detail) == (
        "function f() does not exist",
        "CREATE VIEW v AS SELECT f();",
        "No function matches the given name and argument types.",
    )


def test_psql_errors_keep_the_script_line_for_translation():
    error = first_error('psql:/work/job_x/dump.sql:1234: ERROR:  syntax error at or near "foo"\n')
    assert (error.text, error.script_line) == ('syntax error at or near "foo"', 1234)
    assert error.describe(located=False) == 'syntax error at or near "foo"'
    assert error.describe() == 'psql:/work/job_x/dump.sql:1234: ERROR:  syntax error at or near "foo"'


def test_a_tool_error_without_a_server_keeps_its_words():
    error = first_error("pg_restore: error: could not read from input file: end of file")
    assert error.describe() == "pg_restore: error: could not read from input file: end of file"
    assert first_error("pg_restore: error: a worker process died unexpectedly\n") is None


def test_the_error_lines_kept_apart_name_the_cause_when_the_tail_lost_them():
    tail = "\n".join(["pg_restore: error: a worker process died unexpectedly"] * 3)
    first = "pg_restore: error: could not execute query: ERROR:  permission denied for schema s\nCommand was: CREATE TABLE s.t ();"
    failure = classify_failure(
        CommandResult(1, "", tail, first), "pg_restore into the preview database", CLUSTER
    )
    assert failure.message == (
        "pg_restore into the preview database failed (exit code 1): permission denied for schema s; "
        "the statement was: CREATE TABLE s.t ();"
    )
    assert failure.stderr_tail == tail
