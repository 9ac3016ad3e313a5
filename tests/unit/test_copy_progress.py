"""What the copy reports while it runs, and its stall watchdog (no database)."""

from __future__ import annotations

import threading
import time

from stages.copy import engine
from stages.copy.stream import Flow, SourceTable

TABLE = SourceTable("public.t", "public", "t", ("id",), 1000, oid=16384)


def _progress() -> engine.CopyProgress:
    progress = engine.CopyProgress(tables_total=4, bytes_total=1000, cost_total=2000.0)
    progress.started = time.monotonic() - 10
    progress.tables_done, progress.bytes_done, progress.rows_done, progress.cost_done = 1, 300, 30, 500.0
    flow = Flow()
    flow.rows, flow.bytes = 20, 200
    progress.flows[TABLE] = flow
    return progress


def test_a_report_has_the_step_tables_bytes_rows_per_second_and_an_eta(monkeypatch):
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.01)
    stop = threading.Event()
    reports: list[dict] = []

    def seen(report: dict) -> None:
        reports.append(report)
        stop.set()

    engine._report(_progress(), stop, seen, lambda err: None, 300, lambda: None)
    (report,) = reports
    assert report["step"] == "data" and report["phase"] == "copying rows"
    assert (report["tables_done"], report["tables_total"]) == (1, 4)
    assert (report["bytes_done"], report["bytes_total"]) == (500, 1000)
    assert report["rows_done"] == 50
    assert 4 <= report["rows_per_second"] <= 5
    # 700 of 2000 cost units in about 10 s: 1300 more take about 18.6 s.
    assert 17 <= report["eta_seconds"] <= 19


def test_a_table_whose_rows_stop_coming_stops_the_copy(monkeypatch):
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.01)
    progress = _progress()
    progress.flows[TABLE].last = time.monotonic() - 61
    stopped: list[BaseException] = []
    ended: list[bool] = []
    engine._report(
        progress, threading.Event(), lambda report: None, stopped.append, 60, lambda: ended.append(True)
    )
    (err,) = stopped
    assert isinstance(err, engine.CopyStalled)
    assert "the copy of table public.t made no progress for 60 s" in str(err)
    assert ended == [True]  # the reporter's own resources are released


def test_a_report_the_job_refuses_stops_the_copy(monkeypatch):
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.01)
    stopped: list[BaseException] = []

    def refuse(report: dict) -> None:
        raise RuntimeError("claim lost")

    engine._report(_progress(), threading.Event(), refuse, stopped.append, 300, lambda: None)
    assert [str(e) for e in stopped] == ["claim lost"]
