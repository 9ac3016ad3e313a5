"""One composition root: the web app, the worker and the CLI build their sealer,
control database, broker, queues and object store through `pipeline.services`, never
on their own. No connection is opened here (brokers and databases connect lazily)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import services
from pipeline.config import Settings
from pipeline.queue import StageQueue
from pipeline.sealing import Sealer

ROOT = Path(__file__).resolve().parents[2]
# Constructors that only the composition root may call.
BUILDERS = re.compile(r"\b(Sealer|make_broker|init_database|ObjectStore\.from_settings)\(")


def builders_outside_the_root(sources: dict[str, str]) -> list[str]:
    """`path: call` for each service built outside pipeline/services.py (definitions aside)."""
    found = []
    for path, text in sources.items():
        if path == "pipeline/services.py":
            continue
        for line in text.splitlines():
            match = BUILDERS.search(line)
            if match and not line.lstrip().startswith(("def ", "class ", "#")):
                found.append(f"{path}: {match.group(1)}")
    return found


def _sources() -> dict[str, str]:
    return {
        str(path.relative_to(ROOT)): path.read_text()
        for folder in ("app", "pipeline")
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def test_only_the_composition_root_builds_services():
    assert builders_outside_the_root(_sources()) == []


def test_the_check_sees_a_process_building_its_own():
    sources = _sources()
    sources["pipeline/cli.py"] += "\nbroker = make_broker(settings)\n"
    assert builders_outside_the_root(sources) == ["pipeline/cli.py: make_broker"]


def test_the_root_builds_from_the_settings_it_is_given():
    settings = Settings(
        s3_endpoint="http://127.0.0.1:9000",
        s3_public_endpoint="http://storage.invalid",
        s3_bucket="root-test",
        queue_prefix="capyroot",
        secret_key="k" * 40,
    )
    store = services.object_store(settings)
    assert (store.bucket, store.public_url) == ("root-test", "http://storage.invalid")
    sealed = services.sealer(settings).seal("a source URL")
    assert Sealer("k" * 40).open(sealed) == "a source URL"
    queue = services.stage_queue(settings, publisher=True)
    try:
        assert isinstance(queue, StageQueue)
        assert all(name.startswith("capyroot.") for name in queue.queue_names())
        # The web's publisher: its waits on the broker are bounded (pipeline.queue.make_broker).
        assert queue.broker.parameters.blocked_connection_timeout == settings.broker_blocked_timeout_seconds
    finally:
        queue.broker.close()
