"""Restore slots without a database: the setting, the limit a cluster follows, what a
waiting job shows and how long it waits in one worker."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.config import ConfigError, Settings
from pipeline.models import Cluster
from pipeline.restore_slots import SlotUse, limit_of, waiting_progress, window_for


def test_the_default_limit_is_read_from_capy_cluster_restore_limit():
    assert Settings.from_env({"CAPY_ENV": "development"}).cluster_restore_limit == 4
    assert (
        Settings.from_env(
            {"CAPY_ENV": "development", "CAPY_CLUSTER_RESTORE_LIMIT": "7"}
        ).cluster_restore_limit
        == 7
    )
    with pytest.raises(ConfigError, match="CAPY_CLUSTER_RESTORE_LIMIT must be at least 1, not 0"):
        Settings.from_env({"CAPY_ENV": "development", "CAPY_CLUSTER_RESTORE_LIMIT": "0"})
    with pytest.raises(ConfigError, match="CAPY_CLUSTER_RESTORE_LIMIT must be a whole number"):
        Settings.from_env({"CAPY_ENV": "development", "CAPY_CLUSTER_RESTORE_LIMIT": "four"})


def test_a_clusters_own_limit_wins_over_the_default():
    assert limit_of(Cluster(id="cls_a", restore_limit=None), 4) == 4
    assert limit_of(Cluster(id="cls_a", restore_limit=1), 4) == 1


def test_a_waiting_job_says_how_many_slots_are_taken_and_since_when():
    since = dt.datetime(2026, 11, 29, 14, 0, tzinfo=dt.UTC)
    progress = waiting_progress(SlotUse("cls_a", 4, 4), since)
    assert progress["phase"] == "waiting for a restore slot on the target cluster (4 of 4 in use)"
    assert (progress["restore_slots_in_use"], progress["restore_slot_limit"]) == (4, 4)
    assert progress["restore_slot_queued_ahead"] == 0
    assert progress["waiting_since"] == "2026-11-29T14:00:00Z"
    assert "starts as soon as a slot is its turn" in progress["detail"]
    # A slot free but promised to a restore that began to wait earlier.
    queued = waiting_progress(SlotUse("cls_a", 1, 2, ahead=1), since)
    assert (
        queued["phase"] == "waiting for a restore slot on the target cluster (1 of 2 in use, 1 queued ahead)"
    )
    assert queued["detail"].startswith(
        "1 import is restoring into this project's cluster, which takes at most 2 at once; "
        "1 restore that queued before it goes first; this one starts"
    )


def test_the_wait_in_one_worker_leaves_the_stage_most_of_its_time_limit():
    settings = Settings.from_env({"CAPY_ENV": "development"})
    assert window_for(settings) == 120
    assert window_for(settings.replace(stage_time_limit_seconds=300)) == 30
