"""Creating organizations, clusters, projects and keys for tests, through the core."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import accounts, apikeys
from pipeline.config import Settings
from pipeline.models import Cluster, Organization, Project
from pipeline.sealing import Sealer
from tests.support import pg


@dataclass
class World:
    org: Organization
    cluster: Cluster
    project: Project
    key: str


def local_cluster(settings: Settings) -> Cluster:
    return Cluster.get_or_none(Cluster.name == "local") or accounts.add_cluster(
        "local", pg.ADMIN_URL, Sealer(settings.secret_key)
    )


def make_world(
    settings: Settings, *, storage_limit_bytes: int = 10 * 1024**3, project_key: bool = True
) -> World:
    sealer = Sealer(settings.secret_key)
    cluster = local_cluster(settings)
    org = accounts.create_organization("Test org")
    project = accounts.create_project(
        org, "test", sealer, cluster_id=cluster.id, storage_limit_bytes=storage_limit_bytes
    )
    key = apikeys.create_key(org, project if project_key else None, name="tests").plaintext
    return World(org, cluster, project, key)
