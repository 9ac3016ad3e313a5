"""Every session on a project cluster carries the pinned search_path as a startup option."""

from stages.connections.pgurl import SourceURL
from stages.database.cluster import (
    PINNED_ROLE,
    PINNED_SEARCH_PATH,
    PINNED_SESSION,
    ClusterAdmin,
    RoleLogin,
    pinned,
)


def test_the_pin_is_added_to_a_url_without_options():
    url = SourceURL.parse("postgresql://admin:pw@db.internal:5432/postgres", default_sslmode=None)
    assert PINNED_SEARCH_PATH == "-c search_path=pg_catalog,pg_temp" and PINNED_ROLE == "-c role=none"
    assert pinned(url).params["options"] == f"-c search_path=pg_catalog,pg_temp -c role=none {PINNED_SESSION}"
    assert "-c lock_timeout=10000" in PINNED_SESSION and "-c local_preload_libraries=" in PINNED_SESSION
    assert pinned(url, "-c row_security=off").params["options"] == (
        f"-c search_path=pg_catalog,pg_temp -c role=none {PINNED_SESSION} -c row_security=off"
    )


def test_the_pin_comes_after_options_the_admin_url_sets_so_it_wins():
    url = SourceURL.parse(
        "postgresql://admin@db.internal/postgres?options=-c%20search_path%3Dpublic%20-c%20statement_timeout%3D5000",
        default_sslmode=None,
    )
    assert pinned(url).params["options"] == (
        "-c search_path=public -c statement_timeout=5000 -c search_path=pg_catalog,pg_temp -c role=none "
        + PINNED_SESSION
    )


def test_a_role_url_keeps_the_clusters_address_and_carries_the_role_password_apart():
    admin = ClusterAdmin("postgresql://admin:adminpw@db.internal:6543/postgres?sslmode=verify-full")
    url = admin.role_url("capy_preview_x", RoleLogin("capy_restore_x", "s3cret"))
    assert url.params == {
        "host": "db.internal",
        "port": "6543",
        "dbname": "capy_preview_x",
        "user": "capy_restore_x",
        "sslmode": "verify-full",
    }
    assert url.password == "s3cret" and "s3cret" not in url.conninfo() and "adminpw" not in repr(url)
    assert "s3cret" not in repr(RoleLogin("r", "s3cret"))


def test_a_full_lock_table_is_a_transient_error_that_names_it_not_a_lost_session():
    """psycopg2's OutOfMemory ("out of shared memory": the cluster's lock table was full)
    is an OperationalError, and was reported as the cluster being unavailable."""
    import psycopg2.errors
    import pytest

    from stages.database.cluster import _waits_explained
    from stages.errors import ClusterUnavailable, TransientError

    with pytest.raises(TransientError) as raised, _waits_explained("capy_preview_x"):
        raise psycopg2.errors.OutOfMemory("out of shared memory")
    assert not isinstance(raised.value, ClusterUnavailable)
    assert "max_locks_per_transaction" in raised.value.message and "capy_preview_x" in raised.value.message
