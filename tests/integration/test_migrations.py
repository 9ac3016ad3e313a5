from pipeline.migrations import MIGRATIONS, migrate
from tests.support import pg


def test_migrate_is_idempotent(control_db):
    assert migrate(control_db.database_url) == []
    versions = pg.admin(
        "SELECT version FROM schema_migrations ORDER BY 1", dbname=control_db.database_url.rsplit("/", 1)[1]
    )
    assert [v for (v,) in versions] == [name for name, _ in MIGRATIONS]


def test_migrate_creates_a_missing_control_database():
    name = pg.scratch_name("capy_test_fresh")
    try:
        assert migrate(pg.url_for(name)) == [name for name, _ in MIGRATIONS]
        tables = {
            t for (t,) in pg.admin("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", dbname=name)
        }
        assert {
            "organizations",
            "clusters",
            "projects",
            "api_keys",
            "jobs",
            "job_events",
            "audit_events",
        } <= tables
        assert migrate(pg.url_for(name)) == []
    finally:
        pg.drop_db(name)
