"""stages.finalize.verify_preview on a real preview: the tables whose rows the dump did
not count (`present`, a dump's INSERT statements) need not match a count, but must exist."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.finalize import VerificationFailed, verify_preview
from tests.support import pg

ADMIN = ClusterAdmin(pg.ADMIN_URL)


@pytest.fixture
def preview() -> Iterator[tuple[str, RoleLogin]]:
    """A preview owned by its restore role, holding `public.counted` (2 rows) and
    `public.inserted` (1 row); dropped afterwards."""
    name = pg.scratch_name("capyvp_preview")
    login = ADMIN.ensure_restore_role(pg.scratch_name("capyvp_restore"))
    ADMIN.create_database(name, owner=login.name)
    try:
        with ADMIN.role_connection(name, login, readonly=False) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE public.counted (id int); INSERT INTO public.counted VALUES (1), (2)")
            cur.execute("CREATE TABLE public.inserted (id int); INSERT INTO public.inserted VALUES (1)")
            conn.commit()
        yield name, login
    finally:
        ADMIN.drop_database(name)
        ADMIN.drop_role(login.name)


def test_an_uncounted_table_that_exists_passes_with_its_rows(preview):
    name, login = preview
    counts, _ = verify_preview(
        ADMIN, name, login, {"public.counted": 2}, ["public.inserted"], {}, allowlist=[]
    )
    assert counts == {"public.counted": 2, "public.inserted": 1}


def test_an_uncounted_table_that_is_missing_fails_the_verification(preview):
    name, login = preview
    with pytest.raises(VerificationFailed) as failed:
        verify_preview(
            ADMIN, name, login, {"public.counted": 2}, ["public.inserted", "public.lost"], {}, allowlist=[]
        )
    assert "table public.lost is missing" in failed.value.message
    assert "public.inserted" not in failed.value.message
