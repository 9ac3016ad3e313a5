"""The operators' CLI for credentials and secrets: keys with scopes and expiry, list,
revoke, `secrets rotate`, and refusing to seal without CAPY_SECRET_KEY."""

import datetime as dt

import pytest

from pipeline import apikeys
from pipeline.cli import main
from pipeline.models import ApiKey, Cluster, Job, Project, WebhookEndpoint
from pipeline.sealing import Sealer
from tests.support import pg
from tests.support.cli import run
from tests.support.world import make_world


def test_keys_create_with_scopes_and_expiry_then_list_and_revoke(control_db, capsys):
    world = make_world(control_db)
    org = world.org.id
    code, reader = run(
        control_db,
        capsys,
        "keys",
        "create",
        "--org",
        org,
        "--name",
        "reader",
        "--scope",
        "jobs:read",
        "--expires-in",
        "30",
    )
    assert code == 0 and reader["scopes"] == ["jobs:read"] and reader["state"] == "active"
    expires = dt.datetime.fromisoformat(reader["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(days=29) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    _, pinned = run(
        control_db,
        capsys,
        "keys",
        "create",
        "--org",
        org,
        "--project",
        world.project.id,
        "--expires-at",
        "2099-01-31T00:00:00Z",
    )
    assert pinned["expires_at"] == "2099-01-31T00:00:00Z"
    assert sorted(pinned["scopes"]) == ["jobs:read", "projects:write"]
    _, both = run(
        control_db, capsys, "keys", "create", "--org", org, "--scope", "projects:write", "jobs:read"
    )
    assert both["scopes"] == ["projects:write", "jobs:read"]
    _, repeated = run(
        control_db,
        capsys,
        "keys",
        "create",
        "--org",
        org,
        "--scope",
        "projects:write",
        "--scope",
        "projects:write",
    )
    assert repeated["scopes"] == ["projects:write"]

    _, listed = run(control_db, capsys, "keys", "list", "--org", org)
    ids = [k["id"] for k in listed["keys"]]
    assert reader["id"] in ids and pinned["id"] in ids
    assert all("key" not in k and "key_hash" not in k for k in listed["keys"])
    assert reader["key"] not in str(listed)

    code, revoked = run(control_db, capsys, "keys", "revoke", reader["id"])
    assert code == 0 and revoked["revoked"] is True and revoked["state"] == "revoked"
    with pytest.raises(Exception, match="revoked"):
        apikeys.verify_key(reader["key"])
    code, again = run(control_db, capsys, "keys", "revoke", reader["id"])
    assert code == 0 and again["revoked"] is False

    assert main(["keys", "revoke", pinned["id"]], control_db) == 0
    assert capsys.readouterr().out.startswith(f"revoked API key {pinned['id']}")
    assert main(["keys", "list", "--org", org], control_db) == 0
    text = capsys.readouterr().out
    assert "revoked" in text and pinned["key"] not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "revoke", "key_missing"], "API key key_missing does not exist"),
        (["keys", "list", "--org", "org_missing"], "organization org_missing does not exist"),
        (
            ["keys", "create", "--org", "{org}", "--expires-at", "tomorrow"],
            "--expires-at must be an ISO 8601 time",
        ),
        (
            ["keys", "create", "--org", "{org}", "--expires-at", "2001-01-01T00:00:00Z"],
            "must be in the future",
        ),
        (["keys", "create", "--org", "{org}", "--expires-in", "0"], "--expires-in must be a positive"),
    ],
)
def test_key_command_errors(control_db, capsys, argv, message):
    org = make_world(control_db).org.id
    code, out = run(control_db, capsys, *[a.replace("{org}", org) for a in argv])
    assert code == 1 and message in out["error"]


def test_unknown_scope_is_refused_by_the_parser(control_db, capsys):
    with pytest.raises(SystemExit):
        main(["keys", "create", "--org", "org_x", "--scope", "imports:write"], control_db)
    assert "invalid choice" in capsys.readouterr().err


def test_secrets_rotate_reseals_everything_with_the_current_key(control_db, capsys):
    current = control_db.secret_key  # the run's key stays current so other tests are unaffected
    old = Sealer("the-old-key")
    world = make_world(control_db)
    cluster = Cluster.create(
        id="cls_rotate_" + world.project.id[-8:],
        name="rotate-" + world.project.id,
        admin_url_encrypted=old.seal(pg.ADMIN_URL),
        server_major=15,
    )
    Project.update(role_password_encrypted=old.seal("role-pw")).where(
        Project.id == world.project.id
    ).execute()
    job = Job.create(
        id="job_rotate_" + world.project.id[-8:],
        organization=world.org.id,
        project=world.project.id,
        cluster=world.cluster.id,
        state="failed",
        source_url_encrypted=old.seal("postgresql://u:pw@h/db"),
    )
    endpoint = WebhookEndpoint.create(
        id="whe_rotate_" + world.project.id[-8:],
        organization=world.org.id,
        url="https://hooks.example.com/",
        secret_encrypted=old.seal("whsec_rotate"),
    )
    rotating = control_db.replace(secret_key=f"{current},the-old-key")
    code, done = run(rotating, capsys, "secrets", "rotate")
    assert code == 0, done
    assert done["unreadable"] == []
    assert all(counts["resealed"] >= 1 for counts in done["secrets"].values()), done
    only_current = Sealer(current)
    assert only_current.open(Cluster.get_by_id(cluster.id).admin_url_encrypted) == pg.ADMIN_URL
    assert only_current.open(Project.get_by_id(world.project.id).role_password_encrypted) == "role-pw"
    assert only_current.open(Job.get_by_id(job.id).source_url_encrypted) == "postgresql://u:pw@h/db"
    assert only_current.open(WebhookEndpoint.get_by_id(endpoint.id).secret_encrypted) == "whsec_rotate"
    # Twice is harmless: nothing is left to re-seal.
    code, again = run(rotating, capsys, "secrets", "rotate")
    assert code == 0 and all(c["resealed"] == 0 for c in again["secrets"].values())
    assert main(["secrets", "rotate"], rotating) == 0
    assert "already current" in capsys.readouterr().out
    Cluster.delete().where(Cluster.id == cluster.id).execute()


def test_secrets_rotate_names_what_no_key_opens(control_db, capsys):
    world = make_world(control_db)
    lost = Sealer("a-lost-key").seal("postgresql://u:pw@h/db")
    job = Job.create(
        id="job_lost_" + world.project.id[-8:],
        organization=world.org.id,
        project=world.project.id,
        cluster=world.cluster.id,
        state="failed",
        source_url_encrypted=lost,
    )
    try:
        code, out = run(control_db, capsys, "secrets", "rotate")
        assert code == 1
        assert f"job_source_url of {job.id}" in out["error"] and "add the key" in out["error"]
    finally:
        Job.update(source_url_encrypted=Sealer(control_db.secret_key).seal("x")).where(
            Job.id == job.id
        ).execute()


@pytest.mark.parametrize(
    "argv",
    [
        ["clusters", "add", "--name", "nokey", "--admin-url", pg.ADMIN_URL],
        ["projects", "create", "--org", "{org}", "--name", "nokey"],
        ["secrets", "rotate"],
        ["sweep"],
    ],
)
def test_commands_that_seal_refuse_without_a_secret_key_in_production(control_db, capsys, argv):
    org = make_world(control_db).org.id
    production = control_db.replace(environment="production", secret_key="")
    code, out = run(production, capsys, *[a.replace("{org}", org) for a in argv])
    assert code == 1
    assert out["error"].startswith("CAPY_SECRET_KEY is not set") and "CAPY_ENV=development" in out["error"]
    # Nothing was created with a missing key.
    assert not Cluster.select().where(Cluster.name == "nokey").exists()
    assert not Project.select().where(Project.name == "nokey").exists()


def test_production_refuses_the_development_key(control_db, capsys):
    from pipeline.config import DEV_SECRET_KEY

    production = control_db.replace(environment="production", secret_key=DEV_SECRET_KEY)
    code, out = run(production, capsys, "secrets", "rotate")
    assert code == 1 and "public development key" in out["error"]


def test_key_of_another_org_project_is_refused(control_db, capsys):
    a, b = make_world(control_db), make_world(control_db)
    code, out = run(control_db, capsys, "keys", "create", "--org", a.org.id, "--project", b.project.id)
    assert code == 1 and "does not belong to organization" in out["error"]
    assert not ApiKey.select().where(ApiKey.project == b.project.id, ApiKey.organization == a.org.id).exists()
