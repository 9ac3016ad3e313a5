"""The running service keeps the contract it publishes at GET /v1/openapi.json.

schemathesis (its CLI, as a user would run it) drives real gunicorn from that document,
authenticated with a test key: no 5xx, every answer documented (status, content type,
headers, body schema), and a request without credentials refused. Twice: with the IDs of
a real project and job (so answers with bodies are checked), and with generated IDs.
Bounded: a fixed seed, a fixed number of examples per operation, no stateful phase.

Sources stay on loopback: tests/support/contract_hooks.py points every source URL the
service would accept at a closed loopback port, and the service runs no worker, so no
import runs. (The pytest plugin of schemathesis 4.32.5 does not run on pytest 9.2: it
sets `Node._nodeid`, which pytest 9 no longer has; the CLI does.)
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support.pgcluster import free_port
from tests.support.processes import BIN, start_service
from tests.support.world import make_world

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261129
EXAMPLES = 8  # per operation and generation mode; the coverage phase adds its boundary cases
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
)


@pytest.fixture(scope="module")
def contract_service(control_db, tmp_path_factory):
    # Queues of its own (tests/conftest.py deletes them); no worker; no rate limit in the way.
    settings = control_db.replace(queue_prefix=control_db.queue_prefix + "_contract")
    service = start_service(
        settings, tmp_path_factory.mktemp("contract-logs"), workers=0, CAPY_RATE_LIMIT_PER_MINUTE="1000000"
    )
    yield service
    service.stop()


def write_config(path: Path, sections: dict[str, dict]) -> None:
    """A schemathesis.toml (JSON strings, numbers and booleans are TOML's too)."""
    lines = []
    for section, values in sections.items():
        lines.extend([f"[{section}]"] if section else [])
        lines.extend(f"{json.dumps(key)} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.e2e
@pytest.mark.parametrize("ids", ["real", "generated"])
def test_the_service_keeps_its_documented_contract(contract_service, control_db, tmp_path, ids):
    base = contract_service.base_url
    source = f"postgres://contract:secret@127.0.0.1:{free_port()}/contract"
    world = make_world(control_db, project_key=False)  # an org-wide key
    # One pending job (no worker runs it), for the job routes.
    resp = requests.post(
        f"{base}/v1/projects/{world.project.id}/imports",
        json={"confirm": True, "source_url": source},
        headers={"Authorization": f"Bearer {world.key}"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    config = tmp_path / "schemathesis.toml"
    sections = {
        "": {"seed": SEED, "request-timeout": 60, "workers": 1, "hooks": "tests.support.contract_hooks"},
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "phases.stateful": {"enabled": False},
        # No state between runs (it would replay earlier failures, and write into the tree).
        "cache": {"enabled": False},
        "auth.openapi.bearer": {"bearer": world.key},
    }
    if ids == "real":
        sections["parameters"] = {"project_id": world.project.id, "job_id": resp.json()["job"]["id"]}
    write_config(config, sections)
    done = subprocess.run(
        [
            str(BIN / "schemathesis"), "--config-file", str(config), "run",
            "--checks", ",".join(CHECKS), "--url", base, f"{base}/v1/openapi.json",
        ],
        cwd=ROOT, env={**contract_service.env, "CAPY_CONTRACT_SOURCE": source, "NO_COLOR": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = done.stdout[-20000:] + done.stderr[-5000:]
    assert done.returncode == 0, report + contract_service.log_tail(30)
    # Every operation was tested but the document's own (schemathesis leaves out the URL it loaded).
    operations = sum(
        len(methods)
        for methods in requests.get(f"{base}/v1/openapi.json", timeout=30).json()["paths"].values()
    )
    assert re.search(rf"Tested:\s+{operations - 1}\b", done.stdout), report
    assert re.search(r"\d+ generated, \d+ passed", done.stdout), report
