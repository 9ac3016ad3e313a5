"""The block walk's page release, attacked (stages.dumps.archivecheck._BlockWalk.release):
the walk must answer exactly as it does without releasing a page (as before), whatever
the archive: released often (every page, every byte), at chunks that jump far, near the
end, in blobs blocks, in files whose size is not page aligned or is a multiple of 16 MB."""

from __future__ import annotations

import mmap
import random
from pathlib import Path

import pytest

import stages.dumps.archivecheck as archivecheck
from tests.unit.test_archivecheck_hostile import _archive, _blobs_block, _int, _table_block


def _answers(path: Path, **kw) -> tuple:
    """(the walk's answer never releasing a page, as before the release; its answer
    releasing every RELEASE_BYTES as the test set it)."""

    def answer():
        try:
            return ("ok", archivecheck.problem(str(path), "custom", **kw))
        except Exception as err:  # noqa: BLE001 - compared, then checked below
            return ("raised", type(err).__name__)

    released = answer()
    chosen = archivecheck.RELEASE_BYTES
    archivecheck.RELEASE_BYTES = 1 << 62
    try:
        kept = answer()
    finally:
        archivecheck.RELEASE_BYTES = chosen
    return kept, released


def _random_section(rng: random.Random, k: int) -> bytes:
    out = b""
    for dump_id in range(1, rng.randint(1, 6)):
        if rng.random() < 0.3:
            objects = [
                (
                    rng.randint(1, 1 << 20),
                    [
                        rng.randbytes(rng.choice([0, 1, 7, 4095, 4096, 4097, 9000]))
                        for _ in range(rng.randint(0, 4))
                    ],
                )
                for _ in range(rng.randint(0, 4))
            ]
            out += _blobs_block(dump_id, objects, k)
        else:
            chunks = [
                rng.randbytes(rng.choice([1, 3, 4095, 4096, 4097, 12000, 70000]))
                for _ in range(rng.randint(0, 6))
            ]
            out += _table_block(dump_id, chunks, k)
    return out


@pytest.mark.parametrize("release_bytes", [1, 7, mmap.PAGESIZE, mmap.PAGESIZE + 1, 3 * mmap.PAGESIZE - 5])
def test_the_walk_answers_as_before_however_often_it_releases(tmp_path, monkeypatch, release_bytes):
    monkeypatch.setattr(archivecheck, "RELEASE_BYTES", release_bytes)
    rng = random.Random(release_bytes)
    path = tmp_path / "upload"
    for round_ in range(60):
        k = rng.choice([1, 2, 4, 8])
        section = _random_section(rng, k)
        ids = list(range(1, 7))
        whole = _archive(k, ids, section)
        cuts = {len(whole), len(whole) - 1, rng.randint(0, len(whole)), len(whole) - len(section) // 2}
        # Damage: a chunk length far past the end, a byte flipped.
        variants = [whole[:n] for n in cuts if n >= 0]
        if section:
            at = len(whole) - len(section) + rng.randrange(len(section))
            variants.append(whole[:at] + bytes([rng.randrange(256)]) + whole[at + 1 :])
        variants.append(whole + bytes([1]) + _int(9, k) + _int(1 << (8 * k - 1), k))
        for data in variants:
            path.write_bytes(data)
            before, after = _answers(path)
            assert before == after, (round_, len(data), before, after)
            assert after[0] == "ok", after
            before, after = _answers(path, size=len(data) + 1000)
            assert before == after


@pytest.mark.parametrize("extra", [-1, 0, 1, mmap.PAGESIZE - 1])
def test_archives_at_and_around_multiples_of_the_release_size(tmp_path, extra):
    """A table's chunks reaching exactly 16 MB (and 32), then the end of the file."""
    k = 4
    head = _archive(k, [1], b"")
    target = 2 * archivecheck.RELEASE_BYTES + extra
    path = tmp_path / "upload"
    with open(path, "wb") as fh:
        fh.write(head + bytes([1]) + _int(1, k))
        written = fh.tell()
        chunk = 4096
        while written + 2 * (1 + k) + chunk < target:
            fh.write(_int(chunk, k))
            fh.seek(chunk, 1)
            written = fh.tell()
        last = max(target - written - 2 * (1 + k), 0)
        fh.write(_int(last, k))
        fh.seek(last, 1)
        fh.write(_int(0, k))
    size = path.stat().st_size
    before, after = _answers(path)
    assert before == after == ("ok", None), (size, before, after)
    with open(path, "r+b") as fh:
        fh.truncate(size - 1)
    before, after = _answers(path)
    assert before == after and after[0] == "ok" and after[1] is not None
