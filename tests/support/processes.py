"""Running the service as real processes (gunicorn, dramatiq, the CLI) for e2e tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from pipeline.config import Settings
from tests.support.pgcluster import free_port

BIN = Path(sys.executable).parent


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPY_")}
    env.update(
        CAPY_ENV=settings.environment,
        CAPY_DATABASE_URL=settings.database_url,
        CAPY_BROKER_URL=settings.broker_url,
        CAPY_QUEUE_PREFIX=settings.queue_prefix,
        CAPY_ALLOW_PRIVATE_SOURCES="true" if settings.allow_private_sources else "false",
        CAPY_WORK_DIR=settings.work_dir,
        CAPY_SECRET_KEY=settings.secret_key,
        CAPY_S3_ENDPOINT=settings.s3_endpoint,
        CAPY_S3_PUBLIC_ENDPOINT=settings.s3_public_endpoint,
        CAPY_S3_BUCKET=settings.s3_bucket,
        CAPY_S3_ACCESS_KEY=settings.s3_access_key,
        CAPY_S3_SECRET_KEY=settings.s3_secret_key,
        CAPY_CONCURRENCY=str(settings.concurrency),
        CAPY_SPARE_DATABASES=str(settings.spare_databases),
        CAPY_LOG_LEVEL=settings.log_level,
        CAPY_RETRY_BACKOFF_SECONDS=str(settings.retry_backoff_seconds),
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


def migrated_with_local_cluster(settings: Settings) -> dict[str, str]:
    """Migrate the control database of `settings` and register this machine's cluster
    as `local` there if it is not yet; returns the processes' environment."""
    from tests.support import pg

    env = service_env(settings)
    cli(env, "migrate")
    known = pg.admin(
        "SELECT id FROM clusters WHERE name = 'local'", dbname=settings.database_url.rsplit("/", 1)[1]
    )
    if not known:
        cli(env, "clusters", "add", "--name", "local", "--admin-url", pg.ADMIN_URL)
    return env


def cli(env: dict[str, str], *args: str) -> dict:
    """Run `capy-imports --json ARGS` and return its one JSON object."""
    done = subprocess.run(
        [str(BIN / "capy-imports"), "--json", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise AssertionError(f"capy-imports {' '.join(args)} failed: {done.stdout}{done.stderr}")
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


@dataclass
class Service:
    base_url: str
    env: dict[str, str]
    logs: dict[str, Path]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(out)

    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path | None = None

    def stop(self) -> None:
        """Stop every process and its children: each runs in a session of its own, so a
        dramatiq master's worker processes go with it (an orphaned worker would go on
        consuming this run's queues in a later test)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def start_worker(self, name: str, *, queues: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
        """Another dramatiq worker (a process group of its own: its master and worker
        processes), with `env` on top of the service's; `queues`: only these queues'
        messages (every queue's when empty)."""
        assert self.log_dir is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.logs[name] = self.log_dir / f"{name}.log"
        with open(self.logs[name], "ab") as handle:
            process = subprocess.Popen(
                [str(BIN / "dramatiq"), "--processes", "1", "--threads", "3", "pipeline.worker"]
                + (["--queues", *queues] if queues else []),
                env={**self.env, **env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
                start_new_session=True,
            )
        self.processes.append(process)
        self.workers[name] = process
        return process

    def worker_holding(self, pid: int) -> str:
        """The name of the worker whose process tree has `pid` (claimed_by's pid)."""
        for name, process in self.workers.items():
            if pid == process.pid or parent_pid(pid) == process.pid:
                return name
        raise AssertionError(f"no worker of this service runs pid {pid}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a worker's whole process group, as a crash or a deploy would."""
        try:
            os.killpg(self.workers[name].pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self) -> None:
        """SIGKILL every process of the service, as a host that loses power."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    process.kill()
        for process in self.processes:
            process.wait()


def running_processes(*, environment: bool = False) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """This host's processes as /proc shows them: (pid, argv, and with `environment`
    its environment's entries, else []); those gone meanwhile or not ours to read are
    left out."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            env: list[bytes] = []
            if environment:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    env = fh.read().split(b"\0")
        except OSError:
            continue
        yield int(entry), argv, env


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def start_service(
    settings: Settings,
    log_dir: Path,
    *,
    workers: int = 1,
    web_workers: int = 2,
    worker_env: dict[str, str] | None = None,
    **extra_env: str,
) -> Service:
    """gunicorn and `workers` dramatiq workers (named worker, worker2, …; each a process
    group of its own) over `settings`; `worker_env` goes to the workers only."""
    port = free_port()
    env = service_env(settings, PORT=str(port), **extra_env)
    logs = {"web": log_dir / "web.log"}
    service = Service(f"http://127.0.0.1:{port}", env, logs, log_dir=log_dir)
    commands = {
        # A control socket of its own: gunicorn's default path is shared by every instance.
        "web": [
            str(BIN / "gunicorn"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(web_workers),
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--timeout",
            "30",
            "--control-socket",
            str(log_dir / "gunicorn.ctl"),
            "app.wsgi:get_app()",
        ],
    }
    for number in range(workers):
        service.start_worker("worker" if number == 0 else f"worker{number + 1}", **(worker_env or {}))
    for name, command in commands.items():
        handle = open(logs[name], "wb")  # noqa: SIM115 - owned by the process for its lifetime
        service.processes.append(
            subprocess.Popen(
                command,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
                start_new_session=True,  # kill_all reaches its workers too
            )
        )
        handle.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(service.base_url + "/readyz", timeout=5).status_code == 200:
                return service
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or slow to answer on a busy machine
        if any(p.poll() is not None for p in service.processes):
            break
        time.sleep(0.3)
    service.stop()
    raise AssertionError("the service did not become ready:\n" + service.log_tail())


def wait_for_job(service: Service, key: str, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = requests.get(
            f"{service.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        assert resp.status_code == 200, resp.text
        job = resp.json()["job"]
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s:\n" + service.log_tail())
