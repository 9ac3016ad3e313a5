"""The operators' CLI, in-process against the real control database and cluster."""

import urllib.parse

import pytest
from psycopg2 import sql

from pipeline.cli import main
from pipeline.db import init_database
from tests.support import pg
from tests.support.cli import run
from tests.support.world import local_cluster


def test_create_everything_and_show_it(control_db, capsys):
    code, migrated = run(control_db, capsys, "migrate")
    assert code == 0 and migrated == {"applied": []}
    _, org = run(control_db, capsys, "orgs", "create", "--name", "Acme")
    assert org["id"].startswith("org_") and org["name"] == "Acme"
    cluster = local_cluster(control_db)
    _, project = run(
        control_db,
        capsys,
        "projects",
        "create",
        "--org",
        org["id"],
        "--name",
        "shop",
        "--cluster",
        cluster.id,
        "--storage-limit-bytes",
        "5000000",
    )
    assert project["id"].startswith("prj_") and project["storage_limit_bytes"] == 5_000_000
    assert pg.database_exists(project["database_name"])
    _, key = run(
        control_db, capsys, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "ci"
    )
    assert (
        key["key"].startswith("capy_live_")
        and key["project_id"] == project["id"]
        and key["key_prefix"] == key["key"][:22]
    )
    _, listed = run(control_db, capsys, "jobs", "list", "--project", project["id"])
    assert listed == {"jobs": []}


def test_text_output_says_what_was_done(control_db, capsys):
    assert main(["orgs", "create", "--name", "Text Org"], control_db) == 0
    assert capsys.readouterr().out.startswith("created organization org_")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["projects", "create", "--org", "org_missing", "--name", "x"],
            "organization org_missing does not exist",
        ),
        (["keys", "create", "--org", "org_missing"], "organization org_missing does not exist"),
        (["jobs", "show", "job_missing"], "job job_missing does not exist"),
        (["clusters", "add", "--name", "bad", "--admin-url", "mysql://x"], "must start with postgres://"),
    ],
)
def test_errors_are_one_json_object_and_exit_1(control_db, capsys, argv, message):
    code, out = run(control_db, capsys, *argv)
    assert code == 1 and message in out["error"]


def test_unreachable_control_database_is_explained(control_db, capsys):
    broken = control_db.replace(database_url="postgresql://postgres@127.0.0.1:1/x")
    try:
        code, out = run(broken, capsys, "jobs", "list")
    finally:
        init_database(control_db.database_url)  # the CLI re-pointed the shared proxy
    assert code == 1
    assert out["error"].startswith("cannot use the control database (connection to server at")
    assert out["error"].endswith("then run: capy-imports migrate")


def test_a_cluster_name_is_registered_once(control_db, capsys):
    name = pg.scratch_name("twice")
    code, first = run(control_db, capsys, "clusters", "add", "--name", name, "--admin-url", pg.ADMIN_URL)
    assert code == 0 and first["name"] == name
    code, again = run(control_db, capsys, "clusters", "add", "--name", name, "--admin-url", pg.ADMIN_URL)
    assert code == 1
    assert again["error"] == (
        f"a cluster named {name!r} is already registered ({first['id']}); choose another name"
    )
    code, blank = run(control_db, capsys, "clusters", "add", "--name", "  ", "--admin-url", pg.ADMIN_URL)
    assert (code, blank) == (1, {"error": "the cluster needs a name"})


def test_a_cluster_whose_admin_is_not_a_superuser_is_refused(control_db, capsys):
    """A CREATEDB CREATEROLE admin would be registered, and every import into the cluster
    would then fail far from the cause (README, "Security: the privilege model")."""
    role = pg.scratch_name("capy_notsuper")
    pg.admin(sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE").format(sql.Identifier(role)))
    try:
        parts = urllib.parse.urlsplit(pg.ADMIN_URL)
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
        code, out = run(control_db, capsys, "clusters", "add", "--name", role, "--admin-url", url)
        assert code == 1
        assert out["error"].startswith(f"the admin URL's role {role!r} is not a superuser;")
        assert "use a superuser's URL" in out["error"]
        _, listed = run(control_db, capsys, "clusters", "list")
        assert role not in {cluster["name"] for cluster in listed["clusters"]}
    finally:
        pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x" * 64, "a cluster's name has at most 63 characters, not 64"),
        ("a\nb", "a cluster's name may not hold control or invisible characters"),
        ("\x1b[31mred", "a cluster's name may not hold control or invisible characters"),
        ("\u200b", "a cluster's name may not hold control or invisible characters"),
        ("ba\u200bse", "a cluster's name may not hold control or invisible characters"),
    ],
)
def test_a_cluster_name_that_would_not_read_back_is_refused(control_db, capsys, name, message):
    code, out = run(control_db, capsys, "clusters", "add", "--name", name, "--admin-url", pg.ADMIN_URL)
    assert code == 1 and out["error"].startswith(message)


def test_names_differing_in_case_or_spaces_are_one_name(control_db, capsys):
    name = pg.scratch_name("Case")
    _, first = run(control_db, capsys, "clusters", "add", "--name", name, "--admin-url", pg.ADMIN_URL)
    for again in (name.upper(), f" {name.lower()}\t"):
        code, out = run(control_db, capsys, "clusters", "add", "--name", again, "--admin-url", pg.ADMIN_URL)
        assert code == 1
        assert (
            out["error"]
            == f"a cluster named {name!r} is already registered ({first['id']}); choose another name"
        )


def test_an_admin_url_the_service_cannot_use_with_its_session_options_is_refused(control_db, capsys):
    """The URL's own options end in a backslash, which swallows the space before the
    options every admin session appends: a plain session works, the service's would not."""
    url = pg.ADMIN_URL + "?options=-c%20application_name%3Dadm%5C"
    code, out = run(
        control_db, capsys, "clusters", "add", "--name", pg.scratch_name("bs"), "--admin-url", url
    )
    assert code == 1
    assert "refuses the options the service sets on every admin session" in out["error"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            pg.url_for("capy_no_such_database"),
            "has no database 'capy_no_such_database'; check the database name",
        ),
        ("postgresql://capy_no_such_role@127.0.0.1:5432/postgres", "has no user 'capy_no_such_role'"),
        ("postgresql://postgres@127.0.0.1:99999/postgres", "the admin URL has an invalid port"),
    ],
)
def test_an_admin_url_that_cannot_connect_says_why(control_db, capsys, url, message):
    code, out = run(
        control_db, capsys, "clusters", "add", "--name", pg.scratch_name("why"), "--admin-url", url
    )
    assert code == 1 and message in out["error"], out
    assert "try again shortly" not in out["error"]


def test_an_argument_that_is_not_utf8_is_refused_without_echoing_it(control_db, capsys):
    garbled = "postgresql://postgres:Pw\udcffSecret7@127.0.0.1:5432/postgres"
    code, out = run(control_db, capsys, "clusters", "add", "--name", "u1", "--admin-url", garbled)
    assert code == 1
    assert out == {"error": "the value given for admin-url is not valid UTF-8 text; type it again in UTF-8"}
