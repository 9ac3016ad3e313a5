"""Worker file paths are kept out of what users see."""

from stages.tools.workpaths import scrub_work_paths

JOB = "/tmp/capy-imports/job_0123456789abcdefghjk"


def test_psql_errors_name_the_dump_not_the_work_file():
    stderr = f'psql:{JOB}/dump.sql:123: ERROR:  relation "nowhere" does not exist'
    assert scrub_work_paths(stderr) == 'psql:<dump>:123: ERROR:  relation "nowhere" does not exist'


def test_every_work_file_gets_a_neutral_name():
    text = (
        f'pg_restore: error: could not open input file "{JOB}/upload": No such file\n'
        f"pg_restore: error: could not open TOC file {JOB}/restore.list for input\n"
        f"pg_dump: error: could not write to file {JOB}/dump/3456.dat.gz\n"
        f'could not read "/srv/work/preflight-x1_y2/head"\n'
        f"mkdir {JOB}/scratch/x failed\n"
        f"cd {JOB}"
    )
    assert scrub_work_paths(text) == (
        'pg_restore: error: could not open input file "<dump>": No such file\n'
        "pg_restore: error: could not open TOC file <restore list> for input\n"
        "pg_dump: error: could not write to file <dump>\n"
        'could not read "<dump>"\n'
        "mkdir <work file> failed\n"
        "cd <work file>"
    )


def test_other_text_is_left_alone():
    text = 'ERROR:  relation "public.job_orders" does not exist at /usr/lib/postgresql/15/bin/psql; job_x'
    assert scrub_work_paths(text) == text
    assert scrub_work_paths("") == ""


def test_a_long_line_of_slashes_is_scrubbed_in_one_pass():
    text = "/a" * 200_000 + f" {JOB}/dump.sql:1: ERROR"
    assert scrub_work_paths(text) == "/a" * 200_000 + " <dump>:1: ERROR"


def test_files_in_a_stages_own_folder_get_the_same_names():
    text = (
        f"psql:{JOB}/restore-k2_9xq/dump.sql:7: ERROR:  boom\n"
        f'pg_restore: error: could not open input file "{JOB}/fetch-a1b2c3/upload"\n'
        f"could not open TOC file {JOB}/restore-zz9/restore.list\n"
        f"mkdir {JOB}/restore-zz9/x"
    )
    assert scrub_work_paths(text) == (
        "psql:<dump>:7: ERROR:  boom\n"
        'pg_restore: error: could not open input file "<dump>"\n'
        "could not open TOC file <restore list>\n"
        "mkdir <work file>"
    )
