from stages.database.inventory import compare_counts


def test_compare_counts_names_missing_tables_and_mismatches():
    problems = compare_counts({"public.a": 3, "public.b": 5, "s.c": 0}, {"public.a": 3, "public.b": 4})
    assert problems == ["table public.b has 4 rows, the source has 5", "table s.c is missing"]


def test_compare_counts_equal():
    assert compare_counts({"public.a": 1}, {"public.a": 1, "public.extra": 2}) == []
