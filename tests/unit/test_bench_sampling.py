"""The bench's memory samples (bench/sampling.py): a worker's children are summed by
their proportional set size, so a child between fork and exec, whose pages are still
its parent's, is not counted twice."""

import os
from pathlib import Path

from bench.sampling import pss_bytes, rss_bytes

MB = 1024 * 1024


def test_a_forked_child_shares_its_parents_pages_and_is_not_counted_twice():
    held = bytearray(os.urandom(64 * MB))  # touched: resident in this process
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits to be measured
        os.close(ready_r)
        os.write(ready_w, b"x")
        os.read(go_r, 1)
        os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        parent, forked = os.getpid(), child
        by_rss = rss_bytes(parent) + rss_bytes(forked)
        by_pss = pss_bytes(parent) + pss_bytes(forked)
        # Both processes map the 64 MB: resident sets count it twice, shares once.
        assert rss_bytes(forked) > 60 * MB
        assert by_rss - by_pss > 50 * MB
        assert by_pss > 60 * MB
    finally:
        os.write(go_w, b"x")
        os.waitpid(child, 0)
        del held


def test_a_process_that_is_gone_holds_nothing(tmp_path: Path):
    assert pss_bytes(999_999_999) == 0
    assert pss_bytes(7, proc=tmp_path) == 0


def test_without_smaps_rollup_the_resident_set_is_used(tmp_path: Path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "statm").write_text("100 25 3 1 0 20 0\n")
    assert pss_bytes(7, proc=tmp_path) == 25 * os.sysconf("SC_PAGE_SIZE")


def test_the_share_is_read_from_smaps_rollup(tmp_path: Path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "smaps_rollup").write_text(
        "55d0-7ffd ---p 00000000 00:00 0    [rollup]\nRss:  2048 kB\nPss:  1536 kB\nPss_Anon: 1000 kB\n"
    )
    assert pss_bytes(7, proc=tmp_path) == 1536 * 1024
