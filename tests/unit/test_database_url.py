"""CAPY_DATABASE_URL is parsed by libpq's rules: every parameter reaches the control
database's connections (no connection is opened here)."""

from __future__ import annotations

import pytest

from pipeline import db
from pipeline.db import connect_params, init_database


def test_the_default_url_gives_the_parameters_it_always_gave():
    assert connect_params("postgresql://postgres@127.0.0.1:5432/capy_imports") == (
        "capy_imports",
        {"host": "127.0.0.1", "port": "5432", "user": "postgres"},
    )


def test_what_the_url_leaves_out_is_the_old_default():
    assert connect_params("postgresql://") == (
        "capy_imports",
        {"host": "127.0.0.1", "port": "5432", "user": "postgres"},
    )
    assert connect_params("postgres://capy@db.invalid/control") == (
        "control",
        {"host": "db.invalid", "port": "5432", "user": "capy"},
    )


def test_every_libpq_parameter_is_kept():
    name, params = connect_params(
        "postgresql://capy:p%40ss%2Fword@db1.invalid:5433,db2.invalid:5434/capy%20control"
        "?sslmode=verify-full&sslrootcert=/etc/capy/ca.pem&connect_timeout=2"
        "&options=-c%20statement_timeout%3D5s&target_session_attrs=read-write&application_name=capy-web"
    )
    assert name == "capy control"
    assert params == {
        "host": "db1.invalid,db2.invalid",
        "port": "5433,5434",
        "user": "capy",
        "password": "p@ss/word",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/capy/ca.pem",
        "connect_timeout": "2",
        "options": "-c statement_timeout=5s",
        "target_session_attrs": "read-write",
        "application_name": "capy-web",
    }


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://%2Fvar%2Frun%2Fpostgresql/capy_imports",
        "postgresql:///capy_imports?host=/var/run/postgresql",
        "host=/var/run/postgresql dbname=capy_imports",
    ],
)
def test_a_unix_socket_host(url):
    name, params = connect_params(url)
    assert name == "capy_imports" and params["host"] == "/var/run/postgresql"


def test_a_key_value_string_and_a_service():
    assert connect_params("host=db.invalid dbname=control sslmode=require user=capy") == (
        "control",
        {"host": "db.invalid", "port": "5432", "user": "capy", "sslmode": "require"},
    )
    # A service file gives host, port and user: no default may override them.
    assert connect_params("postgresql:///control?service=capy") == ("control", {"service": "capy"})


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2-pw@db.invalid/x",
        "postgresql://u:hunter2-pw@db.invalid/x?nosuchparameter=1",
        "host=db password=hunter2-pw dbname",
        # libpq quotes the token it could not decode: here, the password itself.
        "postgresql://u:hunter2%zz@db.invalid/x",
        "postgresql://db.invalid/x?sslpassword=hunter2%zz",
    ],
)
def test_what_libpq_cannot_parse_is_refused_without_its_password(url):
    with pytest.raises(ValueError) as info:
        connect_params(url)
    assert "hunter2-pw" not in str(info.value) and str(info.value)


def test_the_control_database_gets_the_urls_parameters_over_its_defaults():
    previous = db.database.obj
    try:
        control = init_database(
            "postgresql://capy@db.invalid/control?sslmode=verify-full&connect_timeout=2&sslrootcert=/etc/capy/ca.pem"
        )
        assert db.database.obj is control and control.is_closed()
        assert control.database == "control"
        assert control.connect_params == {
            "host": "db.invalid",
            "port": "5432",
            "user": "capy",
            "sslmode": "verify-full",
            "sslrootcert": "/etc/capy/ca.pem",
            "connect_timeout": "2",
            "application_name": "capy-imports",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": db.CONTROL_DB_TCP_TIMEOUT_MS,
        }
    finally:
        db.database.initialize(previous)
