"""The benchmark's verifier: a copy that differs from its source in any counted way fails."""

from bench.sampling import descendants
from bench.verify import Shape, compare

SOURCE = Shape(
    rows={"public.accounts": 600, "public.events": 15_000},
    indexes={"public.accounts": 2, "public.events": 2},
    constraints={"primary key": 2, "foreign key": 1, "unique": 1},
)


def test_an_exact_copy_passes():
    copy = Shape(dict(SOURCE.rows), dict(SOURCE.indexes), dict(SOURCE.constraints))
    assert compare(SOURCE, copy) == []


def test_a_missing_table_is_a_failure():
    copy = Shape({"public.accounts": 600}, {"public.accounts": 2}, {"primary key": 1, "unique": 1})
    assert compare(SOURCE, copy) == [
        "table public.events is missing",
        "0 foreign key constraints, the source 1",
        "1 primary key constraints, the source 2",
    ]


def test_one_row_short_is_a_failure():
    copy = Shape(
        {"public.accounts": 600, "public.events": 14_999}, dict(SOURCE.indexes), dict(SOURCE.constraints)
    )
    assert compare(SOURCE, copy) == ["table public.events has 14999 rows, the source 15000"]


def test_a_missing_index_or_constraint_is_a_failure():
    copy = Shape(
        dict(SOURCE.rows), {"public.accounts": 2, "public.events": 1}, {"primary key": 2, "unique": 1}
    )
    assert compare(SOURCE, copy) == [
        "table public.events has 1 indexes, the source 2",
        "0 foreign key constraints, the source 1",
    ]


def test_an_extra_table_is_a_failure():
    copy = Shape({**SOURCE.rows, "public.stray": 0}, dict(SOURCE.indexes), dict(SOURCE.constraints))
    assert compare(SOURCE, copy) == ["table public.stray is not in the source"]


def test_long_lists_are_cut_and_say_how_many_more():
    source = Shape({f"public.t{i:04}": 1 for i in range(2000)}, {}, {})
    problems = compare(source, Shape({}, {}, {}), limit=10)
    assert len(problems) == 11 and problems[-1] == "... and 1990 more"


def test_the_sampler_finds_every_process_under_the_workers():
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert descendants(parents, [10]) == {11, 12, 13}
    assert descendants(parents, [10, 20]) == {11, 12, 13, 21}
    assert descendants(parents, [99]) == set()
