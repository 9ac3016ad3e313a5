"""The benchmark's arithmetic: medians over verified rounds, ratios, the table, the order."""

import json

import pytest

from bench.report import Result, Round, failures, ratios, table, to_json
from bench.runner import rotated


def result(method, mode, times, *, failed_round=None, extra=None):
    r = Result("mix", 0.3, mode, method, method)
    for number, seconds in enumerate(times, start=1):
        ok = number != failed_round
        r.rounds.append(
            Round(number, seconds, ok, [] if ok else ["table public.events is missing"], extra or {})
        )
    return r


def test_the_median_is_taken_over_the_verified_rounds():
    assert result("dump-pipe", "live", [30.0, 10.0, 20.0]).median == 20.0
    assert result("dump-pipe", "live", [30.0, 10.0, 20.0, 40.0]).median == 25.0
    assert result("dump-pipe", "live", [1.0, 10.0, 20.0], failed_round=1).median == 15.0


def test_ratios_are_service_over_each_baseline_of_the_same_mode():
    results = [
        result("dump-pipe", "live", [40.0, 42.0, 41.0]),
        result("pgcopydb", "live", [36.0, 37.0, 35.0]),
        result("service", "live", [20.0, 21.0, 19.0]),
        result("restore-j2", "upload", [20.0, 20.0, 20.0]),
        result("service-upload", "upload", [22.0, 22.0, 22.0]),
    ]
    got = {key: round(value, 3) for key, value in ratios(results).items()}
    assert got == {
        ("mix", "live", "dump-pipe"): round(20 / 41, 3),
        ("mix", "live", "pgcopydb"): round(20 / 36, 3),
        ("mix", "upload", "restore-j2"): 1.1,
    }


def test_a_failed_method_gives_no_ratio_and_is_flagged_in_the_table():
    results = [
        result("dump-pipe", "live", [40.0, 42.0, 41.0], failed_round=2),
        result("service", "live", [20.0, 21.0, 19.0]),
    ]
    assert ratios(results) == {}
    text = table(results)
    assert "| 2/3 **FAILED** |" in text
    assert failures(results) == ["mix dump-pipe round 2: table public.events is missing"]


def test_a_failed_service_gives_no_ratio():
    results = [result("dump-pipe", "live", [40.0]), result("service", "live", [1.0], failed_round=1)]
    assert ratios(results) == {}
    assert "| - | 0/1 **FAILED** | - |" in table(results)


def test_the_table_shows_medians_ratios_and_peaks():
    results = [
        Result("tiny", 0.02, "live", "dump-pipe", "pg_dump -Fc | pg_restore", [Round(1, 0.5, True)]),
        Result(
            "tiny", 0.02, "live", "service", "the service",
            [Round(1, 1.0, True, extra={"worker_rss_peak_mb": 61.2, "worker_tree_rss_peak_mb": 80.0, "work_dir_peak_mb": 3.4})],
        ),
    ]  # fmt: skip
    lines = table(results).splitlines()
    assert lines[0].startswith("| dataset | scale | mode | method | median s |")
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2] == "| tiny | 0.02 | live | pg_dump -Fc \\| pg_restore | 0.50 | 1/1 | 2.00 |  |  |  |"
    assert lines[3] == "| tiny | 0.02 | live | the service | 1.00 | 1/1 | 1.00 | 61 | 80 | 3.4 |"


def test_the_json_holds_every_round_the_medians_and_the_ratios():
    results = [result("dump-pipe", "live", [4.0, 2.0]), result("service", "live", [1.0, 3.0])]
    document = json.loads(json.dumps(to_json(results, {"scale": 0.3})))
    assert document["scale"] == 0.3
    assert [r["median_s"] for r in document["results"]] == [3.0, 2.0]
    assert len(document["results"][0]["rounds"]) == 2
    assert document["ratios"] == [
        {"dataset": "mix", "mode": "live", "baseline": "dump-pipe", "service_over_baseline": 0.667}
    ]


def test_the_service_keeps_its_median_to_the_poll_apart_from_the_one_to_completion():
    service = Result("mix", 0.3, "live", "service", "service")
    for number, (seconds, polled) in enumerate([(1.0, 1.2), (3.0, 3.1), (2.0, 2.05)], start=1):
        service.rounds.append(Round(number, seconds, True, [], {"polled_s": polled}))
    service.rounds.append(Round(4, 9.0, False, ["a table is missing"], {"polled_s": 9.5}))
    document = to_json([result("dump-pipe", "live", [4.0]), service], {})
    baseline, timed = document["results"]
    assert (timed["median_s"], timed["median_polled_s"]) == (2.0, 2.05)
    assert "median_polled_s" not in baseline


def test_rounds_come_in_mirrored_pairs_each_pair_starting_one_method_later():
    methods = ["a", "b", "c"]
    assert ["".join(rotated(methods, r)) for r in range(7)] == [
        "abc",
        "cba",
        "bca",
        "acb",
        "cab",
        "bac",
        "abc",
    ]


@pytest.mark.parametrize("count", [2, 3, 6])
def test_no_method_follows_the_same_one_in_both_rounds_of_a_pair(count):
    """A rotation alone kept each method right after the same one, round after round."""
    methods = [chr(ord("a") + i) for i in range(count)]

    def before(order: list[str]) -> dict[str, str]:
        return {later: earlier for earlier, later in zip(order, order[1:], strict=False)}

    for pair in range(count):
        first, second = before(rotated(methods, 2 * pair)), before(rotated(methods, 2 * pair + 1))
        assert all(second.get(method) != earlier for method, earlier in first.items())
    # Across the pairs every method runs first.
    assert {rotated(methods, r)[0] for r in range(0, 2 * count, 2)} == set(methods)
