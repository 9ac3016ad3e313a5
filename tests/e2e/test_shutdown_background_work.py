"""A worker or web process stopped right after a schema rehearsal finishes the
rehearsal's drops (in a background thread) before it exits, within 20 s, however the
platform stops it (stages.background.start_held). Found by CI (a `capy_rehearsal_…`
left behind by a worker stopped after a preflight) and by the hostile review: a first fix
that waited in dramatiq's worker shutdown missed a worker process given two SIGTERMs
(dramatiq takes the second as "exit now"), and gunicorn's `worker_exit` hook missed a
gunicorn started without the project's config.

The worker runs the real dramatiq CLI as the Procfile does (`dramatiq … --worker-shutdown-timeout
30000`), over tests/support/slow_drop_worker.py. The web process is gunicorn, with the
production config (`-c python:app.gunicorn_conf`) or as the e2e harness starts it,
answering a real POST /v1/projects/{id}/imports/preflight; its drops are slowed by a
sitecustomize.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.support import pg
from tests.support.pgcluster import free_port
from tests.support.processes import BIN, cli, migrated_with_local_cluster, parent_pid

ROOT = Path(__file__).resolve().parents[2]


def rehearsal_leftovers() -> set[str]:
    rows = pg.admin(
        "SELECT datname FROM pg_database WHERE datname LIKE 'capy\\_rehearsal\\_%%' "
        "UNION SELECT rolname FROM pg_roles WHERE rolname LIKE 'capy\\_rehearsal\\_%%'"
    )
    return {name for (name,) in rows}


def _clean(names: set[str]) -> None:
    from stages.database.cluster import ClusterAdmin

    admin = ClusterAdmin(pg.ADMIN_URL)
    for name in names:
        admin.drop_database(name)
        admin.drop_role(name)


def _wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.05)
    raise AssertionError("the rehearsal did not run:\n" + log.read_text(errors="replace"))


def _start_worker(
    tmp_path: Path, drop_seconds: float, exit_wait: float = 20
) -> tuple[subprocess.Popen, Path, Path]:
    out, log = tmp_path / "rehearsal", tmp_path / "worker.log"
    env = {
        **os.environ,
        "SLOW_DROP_ADMIN_URL": pg.ADMIN_URL,
        "SLOW_DROP_OUT": str(out),
        "SLOW_DROP_DROP_SECONDS": str(drop_seconds),
        "SLOW_DROP_EXIT_WAIT": str(exit_wait),
        "PYTHONPATH": str(ROOT),
    }
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [str(BIN / "dramatiq"), "--processes", "1", "--threads", "2", "--worker-shutdown-timeout", "30000",
             "tests.support.slow_drop_worker"],
            env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return process, out, log


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_pid(int(p)) == pid]


def _stop(process: subprocess.Popen, how: str) -> float:
    started = time.monotonic()
    if how == "group":
        # Every process of the group gets the platform's SIGTERM. Sent at once (killpg),
        # the worker process's own and the master's forwarded one may coalesce into one
        # pending signal (then the test passes by luck); a platform signalling each
        # process, or a master a moment slower to forward, delivers both: made certain
        # here by signalling the worker process first, then the master.
        for child in _children(process.pid):
            os.kill(child, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return time.monotonic() - started


@pytest.mark.e2e
@pytest.mark.parametrize(
    "how",
    [
        # `exec dramatiq …` as PID 1 of a container (docker stop): the master forwards it once.
        "master",
        # Every process of the dyno / cgroup at once (Heroku, systemd KillMode=control-group,
        # tests/support/processes.py Service.kill(name, SIGTERM)): the worker process gets the
        # platform's SIGTERM and the master's forwarded one, and dramatiq takes the second
        # as "kill now" (sys.exit in the worker process), before its own shutdown.
        "group",
    ],
)
def test_a_dramatiq_worker_stopped_right_after_a_rehearsal_leaves_no_rehearsal(tmp_path, how):
    process, out, log = _start_worker(tmp_path, drop_seconds=2)
    name = ""
    try:
        name = _wait_for(out, process, log)
        assert name in rehearsal_leftovers(), "the drop had already finished: the test proves nothing"
        took = _stop(process, how)
        left = rehearsal_leftovers()
        assert name not in left, (how, took, left, log.read_text(errors="replace")[-3000:])
        assert took < 30, took
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _clean({name} if name else set())  # only ours: another run shares the cluster


@pytest.mark.e2e
def test_a_dramatiq_worker_whose_drop_hangs_exits_within_the_bound(tmp_path):
    """A drop that never ends must not hold the worker past stages.background.EXIT_WAIT_SECONDS
    (20 s from the drop's start; 3 s here): the platform's SIGKILL comes at 30 s."""
    process, out, log = _start_worker(tmp_path, drop_seconds=600, exit_wait=3)
    name = ""
    try:
        name = _wait_for(out, process, log)
        took = _stop(process, "master")
        assert took < 20, (took, log.read_text(errors="replace")[-3000:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _clean({name} if name else set())  # only ours: another run shares the cluster


# In the web process the drops are slowed down (the rehearsal itself is the real one):
_SLOW_DROPS = r"""
import os, time
import stages.database.cluster as _cluster
import stages.preflight.sandbox as _sandbox

_name = _sandbox.rehearsal_name

def _recorded_name(*args, **kwargs):
    name = _name(*args, **kwargs)
    with open(os.environ["SLOW_DROP_OUT"], "a") as out:
        out.write(name + "\n")
    return name

_sandbox.rehearsal_name = _recorded_name

_original = _cluster.ClusterAdmin.drop_role

def _slow_drop_role(self, name):
    if name.startswith("capy_rehearsal_"):
        time.sleep(float(os.environ.get("SLOW_DROP_DROP_SECONDS", "4")))
    return _original(self, name)

_cluster.ClusterAdmin.drop_role = _slow_drop_role
"""


@pytest.fixture
def web_tenant(control_db):
    env = migrated_with_local_cluster(control_db)
    org = cli(env, "orgs", "create", "--name", "capy shutdown org")
    project = cli(env, "projects", "create", "--org", org["id"], "--name", "capy-shutdown")
    key = cli(
        env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "capy-shutdown"
    )
    return env, project["id"], key["key"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("config", "how"),
    [
        ("production", "master"),  # gunicorn -c python:app.gunicorn_conf (Procfile), SIGTERM to the master
        ("production", "group"),  # … to every process
        # As the e2e harness starts it (tests/support/processes.py start_service): no
        # `-c python:app.gunicorn_conf`, so no hook of ours runs on the way out.
        ("harness", "master"),
    ],
)
def test_a_web_process_stopped_right_after_a_preflight_leaves_no_rehearsal(
    web_tenant, scratch_db, tmp_path, config, how
):
    env, project, key = web_tenant
    source = scratch_db("capysrc_shutdown")
    pg.psql(source, text="CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t VALUES (1);")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_DROPS)
    port = free_port()
    command = [str(BIN / "gunicorn")]
    if config == "production":
        command += ["-c", "python:app.gunicorn_conf"]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread", "--threads", "4",
                "--control-socket", str(tmp_path / "gunicorn.ctl"), "app.wsgi:get_app()"]  # fmt: skip
    log, out = tmp_path / "web.log", tmp_path / "rehearsals"
    out.touch()
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command,
            env={**env, "PYTHONPATH": f"{site}:{ROOT}", "SLOW_DROP_DROP_SECONDS": "2", "SLOW_DROP_OUT": str(out), "CAPY_BIND_HOST": "127.0.0.1"},
            cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        resp = requests.post(
            f"{base}/v1/projects/{project}/imports/preflight",
            json={"source_url": pg.url_for(source, sslmode="disable")},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        checks = {c["name"]: c["status"] for c in resp.json()["preflight"]["checks"]}
        assert checks.get("schema_rehearsal") == "pass", checks
        ours = set(out.read_text().split())
        assert ours and ours & rehearsal_leftovers(), "the drop had already finished: the test proves nothing"
        took = _stop(process, how)
        left = rehearsal_leftovers() & ours
        assert left == set(), (config, how, took, left, log.read_text(errors="replace")[-3000:])
        assert took < 30, took
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _clean(set(out.read_text().split()))  # only ours: another run shares the cluster
