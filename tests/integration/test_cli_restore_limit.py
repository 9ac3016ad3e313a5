"""`capy-imports clusters set-restore-limit` and `clusters list` (real control database)."""

from __future__ import annotations

import secrets

import pytest

from pipeline import accounts
from pipeline.cli import main
from pipeline.models import Cluster
from pipeline.sealing import Sealer
from tests.support import pg
from tests.support.cli import run


@pytest.fixture
def settings(control_db):
    return control_db.replace(cluster_restore_limit=4)


@pytest.fixture
def cluster(settings):
    return accounts.add_cluster(
        "cli-slots-" + secrets.token_hex(4), pg.ADMIN_URL, Sealer(settings.secret_key)
    )


def test_an_operator_sets_and_clears_a_clusters_restore_limit(settings, cluster, capsys):
    code, done = run(settings, capsys, "clusters", "set-restore-limit", cluster.id, "2")
    assert code == 0, done
    assert (done["id"], done["restore_limit"], done["effective_restore_limit"]) == (cluster.id, 2, 2)
    assert Cluster.get_by_id(cluster.id).restore_limit == 2

    code, listed = run(settings, capsys, "clusters", "list")
    ours = next(c for c in listed["clusters"] if c["id"] == cluster.id)
    assert (ours["restore_limit"], ours["effective_restore_limit"], ours["restores_in_use"]) == (2, 2, 0)
    assert ours["restores_waiting"] == 0

    assert main(["clusters", "list"], settings) == 0
    assert f"{cluster.id}  {cluster.name}  PostgreSQL" in capsys.readouterr().out

    assert main(["clusters", "set-restore-limit", cluster.id, "--default"], settings) == 0
    text = capsys.readouterr().out
    assert (
        f"cluster {cluster.id} ({cluster.name}) now takes at most 4 restores at once (CAPY_CLUSTER_RESTORE_LIMIT)"
        in text
    )
    assert Cluster.get_by_id(cluster.id).restore_limit is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["0"], "a cluster's restore limit must be at least 1, not 0"),
        (
            ["3", "--default"],
            "give either a limit (a whole number, at least 1) or --default, not both or neither",
        ),
        ([], "give either a limit (a whole number, at least 1) or --default, not both or neither"),
    ],
)
def test_a_wrong_restore_limit_is_refused_and_changes_nothing(settings, cluster, capsys, argv, message):
    restore_slots_before = Cluster.get_by_id(cluster.id).restore_limit
    code, out = run(settings, capsys, "clusters", "set-restore-limit", cluster.id, *argv)
    assert (code, out) == (1, {"error": message})
    assert Cluster.get_by_id(cluster.id).restore_limit == restore_slots_before


def test_an_unknown_cluster_is_named(settings, capsys):
    code, out = run(settings, capsys, "clusters", "set-restore-limit", "cls_nope", "2")
    assert (code, out) == (1, {"error": "cluster cls_nope does not exist"})
