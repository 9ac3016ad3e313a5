"""The benchmark harness end to end on a tiny source, with the naive baseline only.

The service is left out (it is the measurement's subject, and its e2e tests are
elsewhere); what is proven here is that the harness builds a source, times a real
`pg_dump -Fc | pg_restore`, verifies the copy, writes its JSON, and that a copy missing a
table is reported as a failure instead of a time.
"""

from __future__ import annotations

import json
import secrets

import pytest

from bench.__main__ import main
from bench.methods import DumpPipeRestore, Timed, Trial
from bench.pg import Cluster
from bench.runner import Plan, run_bench
from bench.sources import ensure_source
from bench.verify import shape
from tests.support import pg


@pytest.fixture(scope="module")
def tiny_scale():
    """A scale of this test's own (so parallel runs never share a source), its source
    dropped afterwards. At about 0.005, tiny has 100 customers and 400 orders."""
    scale = 0.005 + secrets.randbelow(10**5) * 1e-9
    cluster = Cluster(pg.ADMIN_URL)
    yield scale
    from bench.datasets import source_name

    cluster.drop(source_name("tiny", scale))


class DropsATable:
    """The naive baseline, but the copy loses a table afterwards: fast and wrong."""

    name, label, mode = "dump-pipe-lossy", "pg_dump | pg_restore, then a table dropped", "live"

    def run(self, trial: Trial) -> Timed:
        timed = DumpPipeRestore().run(trial)
        trial.cluster.query("DROP TABLE orders CASCADE", dbname=timed.target)
        return timed


def test_the_bench_times_and_verifies_the_naive_baseline(tiny_scale, tmp_path, capsys):
    code = main(
        [
            "--datasets", "tiny", "--scale", repr(tiny_scale), "--rounds", "1",
            "--methods", "dump-pipe", "--admin-url", pg.ADMIN_URL, "--results", str(tmp_path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| tiny |" in out and "| pg_dump -Fc \\| pg_restore |" in out and "| 1/1 |" in out
    (written,) = tmp_path.glob("*.json")
    document = json.loads(written.read_text())
    (only,) = document["results"]
    assert only["method"] == "dump-pipe" and only["failed"] is False and only["median_s"] > 0
    assert document["sources"][0]["database"].startswith("capybench_tiny_s0_005")


def test_a_copy_missing_a_table_fails_verification(tiny_scale, tmp_path):
    cluster = Cluster(pg.ADMIN_URL)
    lines: list[str] = []
    plan = Plan(["tiny"], tiny_scale, 1, [DumpPipeRestore(), DropsATable()])
    run_id = secrets.token_hex(3)
    results, (source,) = run_bench(cluster, plan, tmp_path, say=lines.append, run_id=run_id)
    naive, lossy = results
    assert not naive.failed and naive.median is not None
    assert lossy.failed and lossy.median is None
    assert lossy.rounds[0].problems[0] == "table public.orders is missing"
    assert any(line.startswith("  FAILED dump-pipe-lossy round 1") for line in lines)
    # Both targets were dropped after verification; the source was not touched by either copy.
    assert (
        pg.admin("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"capybench_t_{run_id}_%",)) == []
    )
    assert "public.orders" in shape(cluster, source.database).rows
    assert ensure_source(cluster, "tiny", tiny_scale).built is False


def _content(cluster: Cluster, dbname: str) -> list[tuple]:
    return cluster.query(
        "SELECT (SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM customers c), "
        "(SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o), "
        "(SELECT last_value FROM orders_id_seq)",
        dbname=dbname,
    )


def test_a_rebuilt_source_holds_identical_rows(tiny_scale):
    cluster = Cluster(pg.ADMIN_URL)
    first = ensure_source(cluster, "tiny", tiny_scale)
    before = _content(cluster, first.database)
    again = ensure_source(cluster, "tiny", tiny_scale, rebuild=True, say=lambda line: None)
    assert again.built is True and again.database == first.database
    assert _content(cluster, again.database) == before
