"""`capy-imports secrets rotate`: re-seal every stored secret with the current key.

After putting a new key first in CAPY_SECRET_KEY (the old one after it), this rewrites
clusters' admin URLs, projects' role passwords, jobs' source URLs and webhook endpoints'
secrets so the old key can then be dropped. Each row is a guarded update (`… WHERE column = <old token>`), so a
value changed meanwhile is left alone; running it twice does nothing the second time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import peewee

from pipeline.models import Cluster, Job, Project, WebhookEndpoint
from pipeline.sealing import Sealer
from stages.errors import PermanentError

# (what, model, column): every encrypted column of the control database.
SEALED_COLUMNS: list[tuple[str, type[peewee.Model], peewee.Field]] = [
    ("cluster_admin_urls", Cluster, Cluster.admin_url_encrypted),
    ("project_role_passwords", Project, Project.role_password_encrypted),
    ("job_source_urls", Job, Job.source_url_encrypted),
    ("webhook_secrets", WebhookEndpoint, WebhookEndpoint.secret_encrypted),
]


def rotate_secrets(sealer: Sealer) -> dict[str, Any]:
    """Re-seal what is not sealed with the current key; report counts and unreadable rows."""
    done: dict[str, Any] = {"secrets": {}, "unreadable": []}
    for kind, model, column in SEALED_COLUMNS:
        counts = {"resealed": 0, "current": 0}
        # tuples() makes the rows tuples; to types-peewee they stay models.
        rows = cast(
            "Iterable[tuple[Any, str]]",
            model.select(model._meta.primary_key, column).where(column.is_null(False)).tuples(),
        )
        for row_id, token in rows:
            if sealer.is_current(token):
                counts["current"] += 1
                continue
            try:
                fresh = sealer.reseal(token)
            except PermanentError:
                done["unreadable"].append(f"{kind.removesuffix('s')} of {row_id}")
                continue
            updated = (
                model.update({column: fresh})
                .where((model._meta.primary_key == row_id) & (column == token))
                .execute()
            )
            counts["resealed"] += updated
        done["secrets"][kind] = counts
    return done
