"""The benchmark's generated sources: the same script for a scale, the issue's shapes."""

import re

import pytest

from bench.datasets import DATASETS, dataset_sql, fingerprint, scale_tag, source_name


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_script_is_the_same_for_a_scale_and_differs_between_scales(dataset):
    assert dataset_sql(dataset, 0.3) == dataset_sql(dataset, 0.3)
    assert fingerprint(dataset, 0.3) == fingerprint(dataset, 0.3)
    assert dataset_sql(dataset, 0.3) != dataset_sql(dataset, 0.5)
    assert fingerprint(dataset, 0.3) != fingerprint(dataset, 0.5)


@pytest.mark.parametrize("dataset", DATASETS)
def test_no_value_depends_on_the_clock_or_a_random_generator(dataset):
    script = dataset_sql(dataset, 1).lower()
    for volatile in (
        "random(",
        "now(",
        "clock_timestamp",
        "current_timestamp",
        "gen_random_uuid",
        "timeofday",
    ):
        assert volatile not in script


def test_mix_at_scale_0_3_has_the_issues_row_counts():
    script = dataset_sql("mix", 0.3)
    for table, count in (("accounts", 60_000), ("events", 1_500_000), ("documents", 60_000)):
        insert = re.search(rf"INSERT INTO {table}\b.*?generate_series\(1, (\d+)\) AS i;", script, re.S)
        assert insert and int(insert.group(1)) == count, table
    assert "USING gin (body gin_trgm_ops)" in script
    assert "CREATE INDEX events_account_created ON events (account_id, created_at)" in script
    assert "FOR t IN 1..200 LOOP" in script


def test_many_has_2000_tables_each_with_a_key_an_index_and_a_foreign_key():
    script = dataset_sql("many", 0.02)
    assert "FOR t IN 1..2000 LOOP" in script
    assert "PRIMARY KEY" in script and "REFERENCES parent (id)" in script and "CREATE INDEX" in script


@pytest.mark.parametrize(("scale", "tag"), [(0.3, "0_3"), (1, "1"), (0.02, "0_02"), (2.5, "2_5")])
def test_source_names_carry_the_scale(scale, tag):
    assert scale_tag(scale) == tag
    assert source_name("mix", scale) == f"capybench_mix_s{tag}"


@pytest.mark.parametrize("scale", [0, -1])
def test_a_scale_of_zero_or_below_is_refused(scale):
    with pytest.raises(ValueError, match="the scale must be above 0"):
        dataset_sql("tiny", scale)


def test_an_unknown_dataset_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'huge': choose from mix, narrow, many, tiny"):
        dataset_sql("huge", 1)
