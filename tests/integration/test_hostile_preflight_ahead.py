"""Hostile review of Sandbox.ahead in the API's preflight: the rehearsal database is now
made (CREATE DATABASE, then DROP DATABASE, which waits for a checkpoint of the shared
cluster) on every preflight, also those that never rehearse: a source refused by the
address gate or that does not resolve. Before bb62db7 such a preflight made nothing."""

from __future__ import annotations

from pipeline.imports import ImportRequest
from pipeline.preflights import run_preflight
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from stages.connections.pgurl import SourceURL
from stages.database.cluster import ClusterAdmin
from stages.preflight.sandbox import REHEARSAL_PREFIX, wait_for_drops
from tests.support.world import make_world


def test_a_preflight_whose_source_cannot_be_reached_makes_no_database(control_db, store, monkeypatch):
    world = make_world(control_db)
    made: list[str] = []
    create = ClusterAdmin.create_database

    def spy(self, name, **kwargs):
        made.append(name)
        return create(self, name, **kwargs)

    monkeypatch.setattr(ClusterAdmin, "create_database", spy)
    for _ in range(3):
        result = run_preflight(
            world.project,
            Principal(world.org.id, None, "test"),
            ImportRequest(recreate=False, source=SourceURL.parse_source("postgres://u:pw@db.invalid/app")),
            control_db,
            Sealer(control_db.secret_key),
            store,
        )
        assert not result.report.ok
    wait_for_drops()
    assert [name for name in made if name.startswith(REHEARSAL_PREFIX)] == []
