"""The Procfiles and the Dockerfile: what a platform or an image runs.

The web process binds every interface in production, and gunicorn's --timeout stays
above the synchronous preflight's deadline (CAPY_PREFLIGHT_DEADLINE_SECONDS), so a
preflight answers before gunicorn gives up on the request; the image holds every
package of the project and runs as a user of its own.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex

import pytest

from pipeline.config import Settings
from tests.support.composefile import ROOT


def procfile(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    return dict(
        (key, command.strip()) for key, _, command in (line.partition(":") for line in lines if line.strip())
    )


def gunicorn_words(command: str) -> list[str]:
    """The words of the gunicorn command in a process line (after any `export … &&`)."""
    words = shlex.split(command, posix=False)
    return words[words.index("gunicorn") :]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def dockerfile_cmd() -> str:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    cmd = [line for line in lines if line.startswith("CMD ")]
    assert len(cmd) == 1, cmd
    words = json.loads(cmd[0].removeprefix("CMD "))  # the exec form: sh -c SCRIPT
    assert words[:2] == ["sh", "-c"] and len(words) == 3, words
    return words[2]


WEB_COMMANDS = {
    "Procfile": lambda: procfile("Procfile")["web"],
    "Procfile.dev": lambda: procfile("Procfile.dev")["web"],
    "Dockerfile": dockerfile_cmd,
}


@pytest.mark.parametrize("source", sorted(WEB_COMMANDS))
def test_every_web_command_takes_gunicorns_settings_from_the_app(source):
    """The bind and the timeout come from app/gunicorn_conf.py, derived from the
    settings; a command line that set its own --timeout could fall below the preflight."""
    words = gunicorn_words(WEB_COMMANDS[source]())
    assert option(words, "-c") == "python:app.gunicorn_conf"
    assert "--timeout" not in words
    # One control socket per deployment (per port), never gunicorn's shared default.
    assert "PORT" in option(words, "--control-socket")


def test_gunicorns_timeout_is_above_the_synchronous_preflights_limit(monkeypatch):
    from app import gunicorn_conf

    settings = Settings()
    assert (
        gunicorn_conf.worker_timeout(settings)
        > settings.preflight_deadline_seconds + settings.preflight_command_timeout_seconds
    )
    longer = Settings.from_env({"CAPY_PREFLIGHT_DEADLINE_SECONDS": "45"})
    assert gunicorn_conf.worker_timeout(longer) > 45 + longer.preflight_command_timeout_seconds


def test_the_timeout_the_docs_state_is_the_one_gunicorn_gets():
    """README and compose.yaml said 60 s; gunicorn_conf gives 20 + 15 + 15 = 50 s."""
    from app import gunicorn_conf

    timeout = gunicorn_conf.worker_timeout(Settings())
    text = (ROOT / "README.md").read_text() + (ROOT / "compose.yaml").read_text()
    claimed = re.findall(r"--timeout (\d+)|gunicorn's (\d+) s timeout", text)
    assert len(claimed) >= 3
    assert {a or b for a, b in claimed} == {str(timeout)}


def test_production_binds_every_interface_on_port_and_development_loopback():
    assert "--bind" not in gunicorn_words(procfile("Procfile")["web"])  # app/gunicorn_conf.py: 0.0.0.0:$PORT
    assert (
        option(gunicorn_words(procfile("Procfile.dev")["web"]), "--bind")
        == "${CAPY_BIND_HOST:-127.0.0.1}:${PORT:-8000}"
    )
    env = re.search(r"^ENV (.*)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert "CAPY_BIND_HOST=0.0.0.0" in env.split() and "PORT=8000" in env.split()


def test_the_procfile_runs_the_release_the_worker_and_the_clock():
    processes = procfile("Procfile")
    assert sorted(processes) == ["clock", "release", "web", "worker"]
    assert processes["release"] == "capy-imports migrate"
    assert processes["clock"] == "capy-imports clock --every 60"
    assert "--worker-shutdown-timeout 30000 pipeline.worker" in processes["worker"]


def test_the_image_holds_every_package_of_the_project():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    included = setup["options.packages.find"]["include"].split()
    packages = sorted({name for name in included if "*" not in name})
    assert packages == ["app", "client", "pipeline", "stages"]
    text = (ROOT / "Dockerfile").read_text()
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", text, re.M), f"the image lacks {package}/"
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.M)


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "the context starts empty (no .venv, .capy or dumps sent to the builder)"
    kept = {rule.removeprefix("!") for rule in rules if rule.startswith("!")}
    copied = {
        source
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    assert copied == kept, f"copied {sorted(copied)}, kept in the context {sorted(kept)}"


def test_the_image_runs_as_a_user_of_its_own():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert re.search(rf"useradd .*--uid \d+ .*\b{users[-1]} *\\?$", text, re.M)
    # What the service writes (work files, metric files) belongs to that user.
    assert f"chown {users[-1]}:{users[-1]} /work /metrics" in text


def test_the_image_base_is_pinned_by_version_and_digest():
    bases = re.findall(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert bases
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}", base), base
