"""Migration 0003_auth on a control database that already holds keys with the old scopes."""

from pipeline import migrations
from tests.support import pg


def test_existing_keys_get_the_new_scope_names(monkeypatch):
    name = pg.scratch_name("capy_test_scopes")
    url = pg.url_for(name)
    try:
        before = [m for m in migrations.MIGRATIONS if m[0] < "0003_auth"]
        monkeypatch.setattr(migrations, "MIGRATIONS", before)
        migrations.migrate(url)
        pg.admin(
            "INSERT INTO organizations (id, name) VALUES ('org_a', 'A');"
            "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, scopes) VALUES "
            "('key_both', 'org_a', 'p1', 'h', '[\"imports:write\", \"imports:read\"]'),"
            "('key_read', 'org_a', 'p2', 'h', '[\"imports:read\"]'),"
            "('key_none', 'org_a', 'p3', 'h', '[]')",
            dbname=name,
        )
        monkeypatch.undo()
        assert "0003_auth" in migrations.migrate(url)
        rows = dict(pg.admin("SELECT id, scopes FROM api_keys ORDER BY id", dbname=name))
        assert sorted(rows["key_both"]) == ["jobs:read", "projects:write"]
        assert rows["key_read"] == ["jobs:read"]
        assert rows["key_none"] == []
        pg.admin(
            "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash) VALUES ('key_new', 'org_a', 'p4', 'h')",
            dbname=name,
        )
        (scopes,) = pg.admin("SELECT scopes FROM api_keys WHERE id = 'key_new'", dbname=name)[0]
        assert sorted(scopes) == ["jobs:read", "projects:write"]
    finally:
        pg.drop_db(name)
