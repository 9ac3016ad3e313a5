"""The operators' CLI, in-process against the real control database and cluster."""

import pytest

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
