"""The privilege model on a shared cluster (README, "Security: the privilege model").

A tenant's dump is hostile input: nothing it defines may run in a session of the
service as a superuser, it may reach nothing but its own preview, it may not install
extensions outside the allowlist by any spelling, and no project role may enter a
database that is not its own.
"""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, Project, RetiredDatabase
from pipeline.preflights import preflight_source
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.sweep import sweep
from pipeline.uploads import Uploads
from stages.errors import TransientError
from tests.support import pg
from tests.support.hostile import HIJACK_OBJECTS, PINNED, PLAIN_HIJACK
from tests.support.imports import upload_and_import
from tests.support.inline import InlineQueue
from tests.support.uploading import upload_file
from tests.support.world import make_world

# An archive cannot hold a DO block; a CHECK constraint evaluated for every row the
# restore copies runs the same statement.
ARCHIVE_SHADOW = """
CREATE FUNCTION public.hijack_shadow(id integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE pg_catalog.format('ALTER DATABASE %I SET search_path = public, pg_catalog', pg_catalog.current_database());
    RETURN true;
END $$;
ALTER TABLE public.notes ADD CONSTRAINT notes_shadow CHECK (public.hijack_shadow(id));
INSERT INTO public.notes VALUES (1, 'one'), (2, 'two'), (3, 'three');
"""


def pinned(dbname: str) -> psycopg2.extensions.connection:
    """A test's own superuser session in a tenant database, immune to its shadows."""
    return psycopg2.connect(pg.url_for(dbname), options=PINNED)


def read(dbname: str, query: str, params: tuple = ()) -> list[tuple]:
    conn = pinned(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def connect_as(role: str, dbname: str) -> psycopg2.extensions.connection:
    # The local cluster trusts every login, so passwords prove nothing here; the
    # CONNECT privilege is checked whatever the authentication method.
    return psycopg2.connect(pg.url_for(dbname).replace("postgres@", f"{role}@", 1), options=PINNED)


def restore_role(job: Job) -> str:
    return "capy_restore_" + job.id.removeprefix("job_")


def roles_exist(*names: str) -> set[str]:
    return {
        name for (name,) in pg.admin("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(names),))
    }


def public_can(dbname: str, privilege: str) -> bool:
    return pg.admin("SELECT has_database_privilege('public', %s, %s)", (dbname, privilege))[0][0]


def upload(settings, store, world, data: bytes) -> str:
    made = Uploads(store, expiry=dt.timedelta(hours=1)).create(
        world.project, Principal(world.org.id, None, "test")
    )
    upload_file(made, data)
    return made["object_key"]


def start_paused_before_finalize(
    settings, store, world, data: bytes, *, recreate: bool = False
) -> tuple[Job, InlineQueue]:
    """Run an upload import up to (not including) finalize: its preview and restore role exist."""
    queue = InlineQueue(settings)
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=recreate, upload_key=upload(settings, store, world, data)),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=queue.wake,
    )
    while queue.woken and queue.woken[0][1] != "finalize":
        job_id, stage = queue.woken.popleft()
        queue.runner.run(job_id, stage)
    assert queue.woken and queue.woken[0][1] == "finalize", Job.get_by_id(job.id).error
    return Job.get_by_id(job.id), queue


@pytest.fixture(scope="module")
def archive_hijack(tmp_path_factory) -> Path:
    source = pg.create_db(pg.scratch_name("capysrc_hijack"))
    try:
        conn = pinned(source)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(HIJACK_OBJECTS + ARCHIVE_SHADOW)
        conn.close()
        path = tmp_path_factory.mktemp("hijack") / "hijack.dump"
        import subprocess

        subprocess.run(
            [
                "pg_dump",
                "--format=custom",
                "--exclude-table-data=public.hijack_log",
                f"--file={path}",
                "-d",
                pg.url_for(source),
            ],
            check=True,
            capture_output=True,
        )
        return path
    finally:
        pg.drop_db(source)


@pytest.mark.parametrize("fmt", ["plain", "custom"])
def test_a_dump_cannot_run_code_in_a_service_session(control_db, store, scratch_db, archive_hijack, fmt):
    world = make_world(control_db)
    live = world.project.database_name
    data = PLAIN_HIJACK.encode() if fmt == "plain" else archive_hijack.read_bytes()
    first = upload_and_import(control_db, store, world, data)
    assert first.state == "completed", (first.error, first.last_stderr)
    assert "hijacked" not in (first.error or "")
    # The shadowing setting is in place on the live database...
    assert read(
        live,
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_database d "
        "ON d.oid OPERATOR(pg_catalog.=) s.setdatabase WHERE d.datname OPERATOR(pg_catalog.=) %s",
        (live,),
    ) == [(1,)]
    assert read(live, "SELECT * FROM public.hijack_log") == []
    assert read(live, "SELECT is_called FROM public.hijack_superuser_calls") == [(False,)]

    # ...and the service's sessions still never resolve to the tenant's objects.
    source = scratch_db("capysrc_small")
    pg.psql(source, text="CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    sealer = Sealer(control_db.secret_key)
    project = Project.get_by_id(world.project.id)
    result = preflight_source(project, _local(source), control_db, sealer, recreate=False)
    checks = {check.name: (check.status, check.detail) for check in result.report.checks}
    assert checks["target_database_empty"][0] == "fail", checks["target_database_empty"]
    assert "hijacked" not in checks["target_database_empty"][1]

    second = upload_and_import(
        control_db, store, world, b"CREATE TABLE public.second (id int);\n", recreate=True
    )
    assert second.state == "completed", (second.error, second.last_stderr)
    retained = RetiredDatabase.get(RetiredDatabase.job == second.id).database_name
    log = read(
        retained, "SELECT current_role_name, session_role_name, is_superuser, via FROM public.hijack_log"
    )
    tenant_roles = {project.role_name, restore_role(first), restore_role(second)}
    assert [row for row in log if row[2] or row[0] not in tenant_roles or row[1] not in tenant_roles] == []
    assert log == []
    assert read(retained, "SELECT is_called FROM public.hijack_superuser_calls") == [(False,)]
    assert read(retained, "SELECT id FROM public.notes ORDER BY 1") == [(1,), (2,), (3,)]


def _local(dbname: str):
    from stages.connections.pgurl import SourceURL

    return SourceURL.parse(pg.url_for(dbname, sslmode="disable"))


def _seed(dbname: str, table: str) -> None:
    conn = pinned(dbname)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE {0} (id int); INSERT INTO {0} VALUES (1), (2)").format(
                sql.Identifier("public", table)
            )
        )
    conn.close()


@pytest.fixture
def project_with_retained(control_db, store):
    """A project whose live database holds `current` and whose replaced one holds `kept`."""
    world = make_world(control_db)
    _seed(world.project.database_name, "kept")
    job = upload_and_import(
        control_db,
        store,
        world,
        b"CREATE TABLE public.current (id int);\nINSERT INTO public.current VALUES (1), (2);\n",
        recreate=True,
    )
    assert job.state == "completed", job.error
    retained = RetiredDatabase.get(RetiredDatabase.job == job.id).database_name
    return world, retained


def _intact(world, retained: str) -> None:
    live = world.project.database_name
    assert pg.database_exists(live) and pg.database_exists(retained)
    assert read(live, "SELECT pg_catalog.count(*) FROM public.current") == [(2,)]
    assert read(retained, "SELECT pg_catalog.count(*) FROM public.kept") == [(2,)]


@pytest.mark.parametrize("victim", ["live", "retained", "other tenant"])
def test_a_dump_cannot_drop_databases_it_does_not_restore_into(
    control_db, store, project_with_retained, victim
):
    world, retained = project_with_retained
    other = make_world(control_db).project.database_name
    name = {"live": world.project.database_name, "retained": retained, "other tenant": other}[victim]
    script = f'SET client_min_messages = warning;\nDROP DATABASE IF EXISTS "{name}";\nCREATE TABLE public.after (id int);\n'.encode()
    job = upload_and_import(control_db, store, world, script, recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert f"must be owner of database {name}" in job.error
    assert "cannot drop, create or change any other database" in job.error
    _intact(world, retained)
    assert pg.database_exists(other)
    assert not pg.database_exists(job.preview_database_id)
    assert roles_exist(restore_role(job)) == set()


def test_a_create_clean_dump_of_the_project_itself_is_refused(
    control_db, store, project_with_retained, tmp_path
):
    world, retained = project_with_retained
    live = world.project.database_name
    dump = tmp_path / "create.sql"
    import subprocess

    subprocess.run(
        ["pg_dump", "-Fp", "--clean", "--if-exists", "--create", f"--file={dump}", "-d", pg.url_for(live)],
        check=True,
        capture_output=True,
    )
    assert f"DROP DATABASE IF EXISTS {live};" in dump.read_text()
    job = upload_and_import(control_db, store, world, dump.read_bytes(), recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    # Refused by preflight, from the dump's own statements, before any restore.
    assert "made with pg_dump --create (-C)" in job.error
    assert "without --create" in job.error
    _intact(world, retained)


def test_an_extension_created_over_several_lines_is_found_by_preflight(control_db, store):
    world = make_world(control_db)
    live = world.project.database_name
    _seed(live, "mine")
    script = b"CREATE TABLE public.t (id int);\nCREATE\nEXTENSION tablefunc;\n"
    job = upload_and_import(control_db, store, world, script, recreate=True)
    assert job.state == "failed" and job.stage == "preflight"
    assert "extensions CapyDB does not allow: tablefunc" in job.error
    assert read(live, "SELECT pg_catalog.count(*) FROM public.mine") == [(2,)]


@pytest.mark.parametrize(
    "script",
    [b"CREATE TABLE public.t (id int);\nDO $$ BEGIN EXECUTE 'CREATE ' || 'EXTENSION tablefunc'; END $$;\n"],
    ids=["do-block"],
)
def test_extensions_outside_the_allowlist_are_found_in_the_preview(control_db, store, script):
    world = make_world(control_db)
    live = world.project.database_name
    _seed(live, "mine")
    job = upload_and_import(control_db, store, world, script, recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert "tablefunc" in job.error and "remove" in job.error
    assert job.stage == "finalize"
    assert read(live, "SELECT pg_catalog.count(*) FROM public.mine") == [(2,)]
    assert read(live, "SELECT extname FROM pg_catalog.pg_extension ORDER BY 1") == [("plpgsql",)]
    assert not pg.database_exists(job.preview_database_id)


def _denied(role: str, dbname: str) -> str:
    with pytest.raises(psycopg2.OperationalError) as caught:
        connect_as(role, dbname).close()
    return str(caught.value)


def test_roles_reach_only_their_own_databases(control_db, store, project_with_retained):
    other, other_retained = project_with_retained
    world = make_world(control_db)
    mine = Project.get_by_id(world.project.id)
    control = control_db.database_url.rsplit("/", 1)[1]
    job, queue = start_paused_before_finalize(control_db, store, world, b"CREATE TABLE public.a (id int);\n")
    preview, restorer = job.preview_database_id, restore_role(job)
    assert roles_exist(restorer) == {restorer}
    # Positive controls: each role reaches its own database.
    connect_as(mine.role_name, mine.database_name).close()
    connect_as(restorer, preview).close()
    for role, dbname in [
        (mine.role_name, other.project.database_name),
        (mine.role_name, other_retained),
        (mine.role_name, preview),
        (mine.role_name, control),
        (restorer, mine.database_name),
        (restorer, other.project.database_name),
        (restorer, control),
    ]:
        assert f'permission denied for database "{dbname}"' in _denied(role, dbname), (role, dbname)
    for dbname in (mine.database_name, preview, control, other.project.database_name, other_retained):
        assert not public_can(dbname, "CONNECT") and not public_can(dbname, "TEMPORARY"), dbname
    # TEMP is revoked too: even with CONNECT granted, no temporary tables.
    theirs = other.project.database_name
    pg.admin(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(theirs), sql.Identifier(mine.role_name)
        )
    )
    try:
        conn = connect_as(mine.role_name, theirs)
        try:
            with pytest.raises(
                psycopg2.errors.InsufficientPrivilege, match="permission denied to create temporary tables"
            ):
                conn.cursor().execute("CREATE TEMP TABLE scratch (id int)")
        finally:
            conn.close()
    finally:
        pg.admin(
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(
                sql.Identifier(theirs), sql.Identifier(mine.role_name)
            )
        )

    queue.drain()
    done = Job.get_by_id(job.id)
    assert done.state == "completed", done.error
    # The preview was handed over: the project's role owns the database and all in it.
    live = mine.database_name
    assert read(
        live,
        "SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) %s",
        (live,),
    ) == [(mine.role_name,)]
    assert read(
        live,
        "SELECT DISTINCT pg_catalog.pg_get_userbyid(relowner) FROM pg_catalog.pg_class WHERE relname OPERATOR(pg_catalog.=) 'a'",
    ) == [(mine.role_name,)]
    assert roles_exist(restorer) == set()
    assert not public_can(live, "CONNECT") and not public_can(live, "TEMPORARY")


def test_an_import_locks_down_an_older_projects_database(control_db, store):
    world = make_world(control_db)
    live = world.project.database_name
    # A project made before the service revoked PUBLIC's access.
    pg.admin(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(sql.Identifier(live)))
    job = upload_and_import(control_db, store, world, b"CREATE TABLE public.a (id int);\n", recreate=True)
    assert job.state == "completed", job.error
    retained = RetiredDatabase.get(RetiredDatabase.job == job.id).database_name
    for dbname in (live, retained):
        assert not public_can(dbname, "CONNECT") and not public_can(dbname, "TEMPORARY"), dbname


def test_sweep_locks_down_older_projects_databases(control_db, store):
    world = make_world(control_db)
    live = world.project.database_name
    pg.admin(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(live + "_replaced_1")))
    retired = RetiredDatabase.create(
        cluster=world.cluster.id,
        project=world.project.id,
        job=_ended_job(world).id,
        database_name=live + "_replaced_1",
        drop_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
    )
    # Made before the service revoked PUBLIC's access (new databases are created locked).
    pg.admin(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(sql.Identifier(live)))
    assert public_can(live, "CONNECT") and public_can(retired.database_name, "CONNECT")
    done = sweep(control_db, Sealer(control_db.secret_key), store)
    assert {live, retired.database_name} <= set(done["databases_locked_down"])
    for dbname in (live, retired.database_name):
        assert not public_can(dbname, "CONNECT") and not public_can(dbname, "TEMPORARY"), dbname
    assert live not in sweep(control_db, Sealer(control_db.secret_key), store)["databases_locked_down"]


def _ended_job(world) -> Job:
    return Job.create(
        id="job_" + secrets.token_hex(6),
        organization=world.org.id,
        project=world.project.id,
        cluster=world.cluster.id,
        state="failed",
        stage="preflight",
        upload_key=f"imports/{world.project.id}/gone/dump",
        completed_at=dt.datetime.now(dt.UTC),
    )


def test_migrate_locks_down_the_control_database(control_db):
    from pipeline.migrations import migrate

    control = control_db.database_url.rsplit("/", 1)[1]
    pg.admin(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(sql.Identifier(control)))
    migrate(control_db.database_url)
    assert not public_can(control, "CONNECT") and not public_can(control, "TEMPORARY")


@pytest.mark.parametrize("crash", ["before dropping the restore role", "before the swap"])
def test_a_finalize_retried_after_a_partial_hand_over_completes(control_db, store, monkeypatch, crash):
    from stages.database.cluster import ClusterAdmin

    world = make_world(control_db)
    job, queue = start_paused_before_finalize(
        control_db,
        store,
        world,
        b"CREATE TABLE public.a (id int);\nCOPY public.a (id) FROM stdin;\n1\n2\n\\.\n",
    )
    method = "drop_role" if crash == "before dropping the restore role" else "swap"
    real = getattr(ClusterAdmin, method)
    crashes = []

    def crash_once(self, *args, **kwargs):
        if not crashes:
            crashes.append(method)
            raise RuntimeError(f"the worker died {crash}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ClusterAdmin, method, crash_once)
    queue.drain()
    done = Job.get_by_id(job.id)
    assert crashes == [method]
    assert done.state == "completed", done.error
    assert done.facts.report["tables"] == {"public.a": {"source_rows": 2, "target_rows": 2}}
    assert done.facts.verification is None
    live = world.project.database_name
    assert read(live, "SELECT pg_catalog.count(*) FROM public.a") == [(2,)]
    assert read(
        live,
        "SELECT pg_catalog.pg_get_userbyid(relowner) FROM pg_catalog.pg_class WHERE relname OPERATOR(pg_catalog.=) 'a'",
    ) == [(world.project.role_name,)]
    assert roles_exist(restore_role(job)) == set()


def test_sweep_drops_restore_roles_of_ended_jobs_only(control_db, store):

    world = make_world(control_db)
    failed = upload_and_import(control_db, store, world, b"CREATE TABLE public.a (id int);\nSELECT 1/0;\n")
    assert failed.state == "failed"
    assert roles_exist(restore_role(failed)) == set()
    # A worker that died while cleaning up leaves the role; another deployment's role
    # (a job this control database does not know) is not ours to drop.
    stranger = "capy_restore_" + "z" * 20
    for role in (restore_role(failed), stranger):
        pg.admin(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        done = sweep(control_db, Sealer(control_db.secret_key), store)
        assert restore_role(failed) in done["restore_roles_dropped"]
        assert stranger not in done["restore_roles_dropped"]
        assert roles_exist(restore_role(failed), stranger) == {stranger}
    finally:
        pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(stranger)))


def test_a_tenant_database_is_never_entered_as_a_superuser(scratch_db):
    from stages.database.cluster import ClusterAdmin, RoleLogin
    from stages.errors import PermanentError

    with pytest.raises(PermanentError, match="the role 'postgres' is a superuser"):
        ClusterAdmin(pg.ADMIN_URL).is_empty(scratch_db("capytgt"), RoleLogin("postgres", "x"))


def test_a_new_projects_database_admits_only_its_own_role(control_db):
    world = make_world(control_db)
    live = world.project.database_name
    assert not public_can(live, "CONNECT") and not public_can(live, "TEMPORARY")
    assert pg.admin("SELECT has_database_privilege(%s, %s, 'CONNECT')", (world.project.role_name, live)) == [
        (True,)
    ]


def test_a_dump_cannot_make_the_service_run_as_another_role(control_db, store):
    # A database owner may `ALTER DATABASE … SET role`: a superuser entering that
    # database would then act as that role (here the restore role, which may not hand
    # itself over) unless the session resets it.
    world = make_world(control_db)
    script = (
        b"CREATE TABLE public.a (id int);\n"
        b"DO $$ BEGIN EXECUTE pg_catalog.format('ALTER DATABASE %I SET role = %L', "
        b"pg_catalog.current_database(), current_user); END $$;\n"
    )
    job = upload_and_import(control_db, store, world, script)
    assert job.state == "completed", job.error
    live = world.project.database_name
    assert read(live, "SELECT current_user") == [("postgres",)]
    assert read(
        live,
        "SELECT pg_catalog.pg_get_userbyid(relowner) FROM pg_catalog.pg_class WHERE relname OPERATOR(pg_catalog.=) 'a'",
    ) == [(world.project.role_name,)]


@pytest.mark.parametrize("then", ["completes", "fails"])
def test_a_dump_that_marks_its_database_a_template_cannot_keep_it_undroppable(control_db, store, then):
    world = make_world(control_db)
    script = (
        b"CREATE TABLE public.a (id int);\n"
        b"DO $$ BEGIN EXECUTE pg_catalog.format('ALTER DATABASE %I WITH IS_TEMPLATE true CONNECTION LIMIT 0', "
        b"pg_catalog.current_database()); END $$;\n"
    ) + (b"SELECT 1/0;\n" if then == "fails" else b"")
    job = upload_and_import(control_db, store, world, script)
    if then == "fails":
        assert job.state == "failed" and "division by zero" in job.error
        assert not pg.database_exists(job.preview_database_id)
    else:
        assert job.state == "completed", job.error
        live = world.project.database_name
        assert pg.admin(
            "SELECT datistemplate, datconnlimit FROM pg_database WHERE datname = %s", (live,)
        ) == [(False, -1)]
    assert roles_exist(restore_role(job)) == set()


def test_role_passwords_work_under_password_authentication(password_source):
    # The local cluster trusts every login; this one checks SCRAM passwords, which the
    # service sends only as verifiers it computed (never as plaintext in a statement).
    from stages.database.cluster import ClusterAdmin, RoleLogin
    from stages.errors import ClusterUnavailable

    admin = ClusterAdmin(password_source.url())
    name = "capy_restore_" + "p" * 20
    try:
        login = admin.ensure_restore_role(name)
        with admin.role_connection("postgres", login) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_setting('search_path')")
            assert cur.fetchone() == (name, "pg_catalog,pg_temp")
        again = admin.ensure_restore_role(name)  # a new password: the old one stops working
        assert again.password != login.password
        # Refused by our own cluster: ours to fix, so transient, naming no address (the
        # cause, "password authentication failed", is in the log).
        with pytest.raises(ClusterUnavailable):
            with admin.role_connection("postgres", login):
                pass
        with admin.role_connection("postgres", again):
            pass
        admin.ensure_role("capy_prj_" + "p" * 20, "project-secret")
        with admin.role_connection("postgres", RoleLogin("capy_prj_" + "p" * 20, "project-secret")):
            pass
    finally:
        admin.drop_role(name)
        admin.drop_role("capy_prj_" + "p" * 20)


def _hold(dbname: str, role: str, statement: str) -> psycopg2.extensions.connection:
    """A tenant's session in `dbname` as `role`, left in an open transaction after
    `statement` (trust auth: the local cluster does not ask for the password a dump
    may have set)."""
    conn = connect_as(role, dbname)
    with conn.cursor() as cur:
        cur.execute(statement)
    return conn


def _finishes(work, seconds: float = 90) -> object:
    """Run `work` in a thread; it must return within `seconds` (a hung worker thread
    is what these tests are about)."""
    import threading

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # the caller asserts on it
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def test_a_tenant_session_in_the_preview_cannot_hold_finalize(control_db, store):
    """A dump that set its restore role's password lets the tenant log in and lock a
    table of the preview: finalize ends every session but its own and completes."""
    world = make_world(control_db)
    script = (
        b"CREATE TABLE public.t (id int);\nCOPY public.t (id) FROM stdin;\n1\n\\.\n"
        b"DO $$ BEGIN EXECUTE pg_catalog.format('ALTER ROLE %I PASSWORD %L', current_user, 'tenant-knows-this'); END $$;\n"
    )
    job, queue = start_paused_before_finalize(control_db, store, world, script)
    locker = _hold(
        job.preview_database_id, restore_role(job), "BEGIN; LOCK TABLE public.t IN ACCESS EXCLUSIVE MODE"
    )
    try:
        _finishes(lambda: queue.drain())
        done = Job.get_by_id(job.id)
        assert done.state == "completed", (done.error, done.last_stderr)
        with pytest.raises(psycopg2.Error):
            with locker.cursor() as cur:
                cur.execute("SELECT 1")
    finally:
        locker.close()
    assert read(world.project.database_name, "SELECT id FROM public.t") == [(1,)]


def test_a_tenant_transaction_on_its_live_database_does_not_hold_a_worker(control_db):
    """The project role's open `ALTER DATABASE` locks its catalog row: our DDL on that
    database gives up after the pinned lock_timeout, as a transient error, not never."""
    from stages.database.cluster import ClusterAdmin

    world = make_world(control_db)
    live = world.project.database_name
    holder = _hold(live, world.project.role_name, f'BEGIN; ALTER DATABASE "{live}" CONNECTION LIMIT 50')
    try:
        with pytest.raises(TransientError, match="holds a lock"):
            _finishes(lambda: ClusterAdmin(pg.ADMIN_URL).lock_down(live), seconds=60)
    finally:
        holder.close()


def test_settings_an_owner_puts_on_its_database_do_not_reach_our_sessions(control_db):
    """statement_timeout, local_preload_libraries and read-only transactions set on the
    project's live database by its owner change nothing in the service's sessions."""
    from stages.database.cluster import ClusterAdmin, RoleLogin

    world = make_world(control_db)
    live = world.project.database_name
    owner = world.project.role_name
    conn = connect_as(owner, live)
    conn.autocommit = True
    with conn.cursor() as cur:
        for setting in (
            "statement_timeout = '1ms'",
            "local_preload_libraries = 'auto_explain'",
            "default_transaction_read_only = on",
            "lock_timeout = '1ms'",
        ):
            cur.execute(f'ALTER DATABASE "{live}" SET {setting}')
    conn.close()
    admin = ClusterAdmin(pg.ADMIN_URL)
    assert admin.is_empty(live, RoleLogin(owner, "trust-auth-ignores-it")) is True
    admin.lock_down(live)
    with admin.autocommit(live) as cur:
        cur.execute(
            "SELECT pg_catalog.current_setting('statement_timeout'), pg_catalog.current_setting('transaction_read_only')"
        )
        assert cur.fetchone() == ("0", "off")
