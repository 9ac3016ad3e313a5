"""Organizations, clusters and projects: what operators create with the CLI."""

from __future__ import annotations

import secrets
import unicodedata

import peewee

from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.ids import new_id
from pipeline.models import Cluster, Organization, Project
from pipeline.sealing import Sealer
from stages.connections.pgurl import InvalidSourceURL
from stages.database.cluster import ClusterAdmin

DEFAULT_STORAGE_LIMIT_BYTES = 10 * 1024**3


def create_organization(name: str, *, clerk_org_id: str | None = None, plan: str = "free") -> Organization:
    if not name.strip():
        raise InvalidRequest("the organization needs a name")
    return Organization.create(id=new_id("org"), name=name.strip(), clerk_org_id=clerk_org_id, plan=plan)


# A cluster's name: what operators type after --cluster's id is looked up, and what
# `clusters list` prints one per line.
CLUSTER_NAME_MAX = 63


def add_cluster(name: str, admin_url: str, sealer: Sealer) -> Cluster:
    """Register a cluster under a name no other has (ignoring case and surrounding
    spaces); connects to read its server major version and check that it can host
    projects (ClusterAdmin.checked_for_projects)."""
    name = _cluster_name(name)
    taken = _cluster_named(name)
    if taken is not None:
        raise Conflict(
            f"a cluster named {taken.name!r} is already registered ({taken.id}); choose another name"
        )
    try:
        admin = ClusterAdmin(admin_url)
    except InvalidSourceURL as err:
        raise InvalidRequest(err.message.replace("source_url", "the admin URL", 1)) from err
    major = admin.checked_for_projects()
    try:
        return Cluster.create(
            id=new_id("cls"), name=name, admin_url_encrypted=sealer.seal(admin_url), server_major=major
        )
    except peewee.IntegrityError as err:  # registered under that name meanwhile
        taken = _cluster_named(name)
        which = f" ({taken.id})" if taken is not None else ""
        raise Conflict(f"a cluster named {name!r} is already registered{which}; choose another name") from err


def _cluster_name(name: str) -> str:
    """`name` without surrounding spaces, or InvalidRequest saying what is wrong with it."""
    name = name.strip()
    if not name:
        raise InvalidRequest("the cluster needs a name")
    if len(name) > CLUSTER_NAME_MAX:
        raise InvalidRequest(f"a cluster's name has at most {CLUSTER_NAME_MAX} characters, not {len(name)}")
    if any(unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp") for ch in name):
        raise InvalidRequest(
            "a cluster's name may not hold control or invisible characters (line breaks, "
            "escapes, zero-width spaces); use letters, digits, spaces and punctuation"
        )
    return name


def _cluster_named(name: str) -> Cluster | None:
    return Cluster.get_or_none(peewee.fn.lower(Cluster.name) == name.lower())


def cluster_admin(cluster: Cluster, sealer: Sealer) -> ClusterAdmin:
    return ClusterAdmin(sealer.open(cluster.admin_url_encrypted))


def get_organization(org_id: str) -> Organization:
    org = Organization.get_or_none(Organization.id == org_id)
    if org is None:
        raise NotFound(f"organization {org_id} does not exist")
    return org


def get_project(project_id: str) -> Project:
    project = Project.get_or_none(Project.id == project_id)
    if project is None:
        raise NotFound(f"project {project_id} does not exist")
    return project


def pick_cluster(cluster_id: str | None) -> Cluster:
    if cluster_id:
        cluster = Cluster.get_or_none(Cluster.id == cluster_id)
        if cluster is None:
            raise NotFound(f"cluster {cluster_id} does not exist")
        return cluster
    clusters = list(Cluster.select().order_by(Cluster.created_at))
    if not clusters:
        raise InvalidRequest("no cluster is registered; add one with: capy-imports clusters add")
    if len(clusters) > 1:
        raise InvalidRequest("several clusters are registered; choose one with --cluster")
    return clusters[0]


def create_project(
    organization: Organization,
    name: str,
    sealer: Sealer,
    *,
    cluster_id: str | None = None,
    storage_limit_bytes: int = DEFAULT_STORAGE_LIMIT_BYTES,
) -> Project:
    """Create the project and its empty live database on the cluster."""
    if storage_limit_bytes <= 0:
        raise InvalidRequest("--storage-limit-bytes must be positive")
    cluster = pick_cluster(cluster_id)
    project_id = new_id("prj")
    database_name = "capy_" + project_id
    password = secrets.token_urlsafe(32)
    admin = cluster_admin(cluster, sealer)
    admin.ensure_role(database_name, password)
    admin.create_database(database_name, owner=database_name)
    return Project.create(
        id=project_id,
        organization=organization,
        cluster=cluster,
        name=name,
        database_name=database_name,
        storage_limit_bytes=storage_limit_bytes,
        role_name=database_name,
        role_password_encrypted=sealer.seal(password),
    )


def project_role(project: Project, admin: ClusterAdmin, sealer: Sealer) -> tuple[str, str]:
    """The project's role and password, created (and given the live database) for a
    project made before projects had roles."""
    if project.role_name and project.role_password_encrypted:
        return project.role_name, sealer.open(project.role_password_encrypted)
    password = secrets.token_urlsafe(32)
    admin.ensure_role(project.database_name, password)
    admin.set_owner(project.database_name, project.database_name)
    Project.update(role_name=project.database_name, role_password_encrypted=sealer.seal(password)).where(
        Project.id == project.id
    ).execute()
    return project.database_name, password
