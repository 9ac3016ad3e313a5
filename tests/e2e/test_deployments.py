"""Deployments as operators start them: the Procfile's web line, and refusals at startup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.support.pgcluster import free_port
from tests.support.processes import BIN, service_env

ROOT = Path(__file__).resolve().parents[2]


def procfile_command(name: str, procfile: str = "Procfile") -> str:
    for line in (ROOT / procfile).read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} line in {procfile}")


def start(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            ["sh", "-c", command],
            env=env,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{url} did not serve:\n{log.read_text(errors='replace')}")


def listeners(socket: Path) -> str:
    done = subprocess.run(
        [str(BIN / "gunicornc"), "-s", str(socket), "-c", "show listeners", "-j"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("procfile", ["Procfile", "Procfile.dev"])
def test_two_deployments_on_one_host_each_keep_their_control_socket(control_db, tmp_path, procfile):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    ports = [free_port(), free_port()]
    processes = []
    try:
        for port in ports:
            # The Procfile binds every interface by default; the tests stay on loopback.
            env = service_env(
                control_db,
                PORT=str(port),
                WEB_CONCURRENCY="1",
                XDG_RUNTIME_DIR=str(runtime),
                CAPY_BIND_HOST="127.0.0.1",
            )
            log = tmp_path / f"web-{port}.log"
            processes.append((start(procfile_command("web", procfile), env, log), log))
        for port, (process, log) in zip(ports, processes, strict=True):
            wait_healthy(f"http://127.0.0.1:{port}", process, log)
        # Each deployment answers on its own control socket, about its own listener.
        for port in ports:
            shown = listeners(runtime / f"capy-imports-web-{port}.ctl")
            assert f":{port}" in shown and all(f":{p}" not in shown for p in ports if p != port), shown
        # Stopping one leaves the other's socket (and service) alone.
        stop(processes[0][0])
        assert f":{ports[1]}" in listeners(runtime / f"capy-imports-web-{ports[1]}.ctl")
        assert requests.get(f"http://127.0.0.1:{ports[1]}/healthz", timeout=5).status_code == 200
    finally:
        for process, _ in processes:
            stop(process)


def _production_env(control_db, **extra):
    env = service_env(control_db, **extra)
    env.pop("CAPY_SECRET_KEY")
    env["CAPY_ENV"] = "production"
    return env


@pytest.mark.e2e
def test_web_worker_and_cli_refuse_to_start_in_production_without_a_secret_key(control_db, tmp_path):
    port = free_port()
    env = _production_env(
        control_db,
        PORT=str(port),
        WEB_CONCURRENCY="1",
        XDG_RUNTIME_DIR=str(tmp_path),
        CAPY_BIND_HOST="127.0.0.1",
    )
    for name in ("web", "worker"):
        log = tmp_path / f"{name}.log"
        process = start(procfile_command(name), env, log)
        try:
            code = process.wait(timeout=60)
        finally:
            stop(process)
        output = log.read_text(errors="replace")
        assert code != 0, output
        assert "CAPY_SECRET_KEY is not set" in output and "CAPY_ENV=development" in output, output
    done = subprocess.run(
        [str(BIN / "capy-imports"), "--json", "secrets", "rotate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "CAPY_SECRET_KEY is not set" in json.loads(done.stdout)["error"]
    # Commands that touch no secret still work.
    listed = subprocess.run(
        [str(BIN / "capy-imports"), "--json", "jobs", "list", "--limit", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr


def gunicorn_control(socket: Path, command: str) -> dict:
    done = subprocess.run(
        [str(BIN / "gunicornc"), "-s", str(socket), "-c", command, "-j"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.e2e
def test_the_production_web_process_listens_on_every_interface_with_a_timeout_above_the_preflight(
    control_db, tmp_path
):
    """As a platform runs it: bound to 0.0.0.0:$PORT, and gunicorn lets a request run longer
    than a synchronous preflight may (its deadline comes from the settings)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    env = service_env(
        control_db, PORT=str(port), WEB_CONCURRENCY="1", XDG_RUNTIME_DIR=str(runtime),
        CAPY_PREFLIGHT_DEADLINE_SECONDS="40", CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS="25",
    )  # fmt: skip
    log = tmp_path / "web.log"
    process = start(procfile_command("web"), env, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        socket = runtime / f"capy-imports-web-{port}.ctl"
        assert f"0.0.0.0:{port}" in json.dumps(gunicorn_control(socket, "show listeners"))
        config = gunicorn_control(socket, "show config")
        assert int(config["timeout"]) > 40 + 25, config
    finally:
        stop(process)
