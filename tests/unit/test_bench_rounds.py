"""The benchmark's `--rounds`: one count for every dataset, or more for some."""

import pytest

from bench.__main__ import build_parser
from bench.runner import DEFAULT_ROUNDS, Plan, Rounds


def rounds(raw: str) -> Rounds:
    return build_parser().parse_args(["--rounds", raw]).rounds


def test_one_count_is_every_datasets():
    parsed = rounds("2")
    assert [parsed.of(d) for d in ("mix", "narrow", "many", "tiny")] == [2, 2, 2, 2]


def test_named_datasets_get_their_own_count_and_the_others_the_default():
    parsed = rounds("2,many=5, tiny=7")
    assert (parsed.of("mix"), parsed.of("narrow"), parsed.of("many"), parsed.of("tiny")) == (2, 2, 5, 7)
    assert Plan(["mix", "many"], 1.0, parsed, []).rounds_of("many") == 5


def test_without_a_plain_count_the_others_get_the_default():
    parsed = rounds("many=5")
    assert (parsed.of("many"), parsed.of("mix")) == (5, DEFAULT_ROUNDS)
    assert build_parser().parse_args([]).rounds.of("mix") == DEFAULT_ROUNDS


def test_a_plan_may_still_take_a_plain_count():
    assert Plan(["tiny"], 1.0, 4, []).rounds_of("tiny") == 4


@pytest.mark.parametrize(
    "raw, says",
    [
        ("0", "1 or more"),
        ("two", "whole number"),
        ("2,many=0", "1 or more"),
        ("2,huge=5", "unknown dataset 'huge'"),
        ("2,3", "twice"),
        ("2,many=", "whole number"),
        ("2,many=5,many=7", "many twice"),
        ("\u00b2", "whole number"),
    ],
)
def test_a_bad_count_is_refused_saying_what_to_fix(raw, says, capsys):
    with pytest.raises(SystemExit) as exited:
        rounds(raw)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
