"""What `clusters add` refuses (stages.database.cluster.unfit_for_projects): a cluster too
old for the statements the service runs there, and an admin that is not a superuser. The
refusal against a real cluster is in tests/integration/test_cli.py."""

import pytest

from stages.database.cluster import MIN_CLUSTER_MAJOR, AdminFacts, unfit_for_projects


def facts(version_num: int, version: str, *, superuser: bool = True) -> AdminFacts:
    return AdminFacts(version_num=version_num, version=version, role="admin", superuser=superuser)


@pytest.mark.parametrize(
    ("version_num", "version"),
    [(120018, "12.18"), (110022, "11.22"), (100023, "10.23"), (90624, "9.6.24"), (80423, "8.4.23")],
)
def test_a_cluster_older_than_the_oldest_supported_is_refused(version_num, version):
    problem = unfit_for_projects(facts(version_num, version))
    assert problem is not None
    assert problem.startswith(f"the cluster runs PostgreSQL {version}; a project cluster must run ")
    assert f"PostgreSQL {MIN_CLUSTER_MAJOR} or newer" in problem


@pytest.mark.parametrize("version_num", [130000, 150004, 180001])
def test_a_supported_cluster_with_a_superuser_admin_is_fit(version_num):
    assert unfit_for_projects(facts(version_num, "x")) is None


def test_an_admin_that_is_not_a_superuser_is_refused_and_told_what_to_use():
    problem = unfit_for_projects(facts(150004, "15.4", superuser=False))
    assert problem is not None and problem.startswith("the admin URL's role 'admin' is not a superuser;")
    assert problem.endswith("use a superuser's URL (ALTER ROLE … SUPERUSER)")


def test_the_major_version_reads_both_numberings():
    assert facts(150004, "15.4").major == 15 and facts(90624, "9.6.24").major == 906


def test_a_standby_is_refused_and_told_to_use_the_primary():
    admin = AdminFacts(version_num=150004, version="15.4", role="admin", superuser=True, standby=True)
    problem = unfit_for_projects(admin)
    assert problem is not None and problem.endswith("give the URL of the cluster's primary")
