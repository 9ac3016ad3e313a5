import pytest

from tests.support.processes import cli, migrated_with_local_cluster, start_service


@pytest.fixture(scope="session")
def service(control_db, tmp_path_factory):
    """Real gunicorn and dramatiq processes over this run's control database, keeping
    spare databases on the cluster as a deployment does (CAPY_SPARE_DATABASES)."""
    control_db = control_db.replace(spare_databases=2)
    migrated_with_local_cluster(control_db)
    # A short connect timeout keeps the retry test quick; nothing else waits on it.
    running = start_service(
        control_db, tmp_path_factory.mktemp("service-logs"), CAPY_SOURCE_CONNECT_TIMEOUT="3"
    )
    yield running
    running.stop()


@pytest.fixture
def tenant(service):
    """An organization, project and project key made with the operators' CLI."""
    org = cli(service.env, "orgs", "create", "--name", "E2E org")
    project = cli(service.env, "projects", "create", "--org", org["id"], "--name", "e2e")
    key = cli(service.env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "e2e")
    assert key["key"].startswith("capy_live_") and key["project_id"] == project["id"]
    return {"org": org, "project": project, "key": key["key"]}
