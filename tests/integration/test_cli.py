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
