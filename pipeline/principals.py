"""Who is calling, what they may do, and which projects they may touch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import Forbidden, NotFound
from pipeline.models import Project

# Scopes of API keys. Starting imports, creating uploads and preflight need
# projects:write; reading jobs, job lists and audit events needs jobs:read.
PROJECTS_WRITE = "projects:write"
JOBS_READ = "jobs:read"
SCOPES = (PROJECTS_WRITE, JOBS_READ)
ALL_SCOPES = frozenset(SCOPES)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an organization, optionally narrowed to one project."""

    organization_id: str
    project_id: str | None
    actor: str  # e.g. "api_key:key_…" or "clerk_user:user_…", shown in audit and job events
    scopes: frozenset[str] = ALL_SCOPES

    @property
    def credential(self) -> str:
        """What rate limits count against: one API key, or one Clerk user."""
        return self.actor

    def require(self, scope: str, action: str) -> None:
        """Forbidden, naming the missing scope, unless these credentials carry `scope`."""
        if scope not in self.scopes:
            raise Forbidden(
                f"this API key lacks the scope {scope}, which {action} needs; create a key with "
                f"capy-imports keys create … --scope {scope}"
            )

    def project(self, project_id: str) -> Project:
        """The project, if this caller may use it; 404 for unknown or other orgs' projects.

        Another organization's project answers 404, like an unknown one, so a key
        cannot probe which project IDs exist.
        """
        project = Project.get_or_none(Project.id == project_id)
        if project is None or project.organization_id != self.organization_id:
            raise NotFound(f"project {project_id} does not exist")
        if self.project_id is not None and self.project_id != project_id:
            raise Forbidden(
                f"this API key is scoped to project {self.project_id} and cannot be used "
                f"for project {project_id}; use an organization key or that project's key"
            )
        return project
