"""Hostile custom-format archives for the completeness check (stages.dumps.archivecheck).

The archives are built byte by byte (pg_backup_archiver.c: WriteHead, WriteToc; the
custom format's blocks: WriteDataChunks, _StartBlob...). `problem()` must answer a
string or None and raise nothing else; every cut of a whole archive must be found cut.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from stages.dumps.archivecheck import problem
from stages.dumps.formats import detect_format


def _int(value: int, size: int) -> bytes:
    return bytes([value < 0]) + (abs(value) % (1 << (8 * size))).to_bytes(size, "little")


def _str(text: bytes | None, size: int) -> bytes:
    return _int(-1, size) if text is None else _int(len(text), size) + text


def _archive(
    int_size: int, ids: list[int], data: bytes, *, flag: int = 2, tag: bytes | None = None, tag_length=None
) -> bytes:
    k = int_size
    head = b"PGDMP" + bytes([1, 14, 0, k, 8, 1]) + _int(0, k) + _int(0, k) * 7
    head += _str(b"db", k) + _str(b"15.2", k) + _str(b"15.2", k)
    toc = _int(len(ids), k)
    for dump_id in ids:
        toc += _int(dump_id, k) + _int(1, k) + _str(b"0", k) + _str(b"0", k)
        toc += _int(tag_length, k) if tag_length is not None else _str(tag or b"t", k)
        toc += _str(b"TABLE DATA", k) + _int(3, k) + _str(b"", k) + _str(b"", k)
        toc += _str(b"COPY t FROM stdin;\n", k) + _str(b"public", k) + _str(b"", k) + _str(b"", k)
        toc += (
            _str(b"owner", k) + _str(b"false", k) + _str(None, k) + bytes([flag]) + (0).to_bytes(8, "little")
        )
    return head + toc + data


def _table_block(dump_id: int, chunks: list[bytes], k: int) -> bytes:
    return bytes([1]) + _int(dump_id, k) + b"".join(_int(len(c), k) + c for c in chunks) + _int(0, k)


def _blobs_block(dump_id: int, objects: list[tuple[int, list[bytes]]], k: int) -> bytes:
    body = b"".join(
        _int(oid, k) + b"".join(_int(len(c), k) + c for c in chunks) + _int(0, k) for oid, chunks in objects
    )
    return bytes([3]) + _int(dump_id, k) + body + _int(0, k)


def _problem(tmp_path, data: bytes, **kw):
    path = tmp_path / "upload"
    path.write_bytes(data)
    return problem(str(path), "custom", **kw)


# --- Found: a table of contents' string read with the length it claims -------------


@pytest.mark.parametrize("length", [1 << 63, (1 << 64) - 1, 1 << 62], ids=["2^63", "2^64-1", "2^62"])
def test_a_toc_string_of_absurd_length_is_not_an_unexpected_exception(tmp_path, length):
    """int_size 8 is a header detect_format accepts (1..32); a TOC entry's tag then
    claims 2**62.. bytes. Reader.take handed that number to fh.read(), which raised
    OverflowError (>= 2**63) or MemoryError (it allocates the claimed length first)
    before it could find the file short: neither is End or ValueError, so problem()
    (check_complete in the worker, cut_short_in_head in the upload preflight) raised
    instead of answering."""
    data = _archive(8, [1], _table_block(1, [b"x"], 8), tag_length=length)
    (tmp_path / "head").write_bytes(data)
    assert detect_format(tmp_path / "head").format == "custom"  # reachable: the header is accepted
    # A string longer than the file: the file ends inside its table of contents.
    assert "ends inside its table of contents" in _problem(tmp_path, data)
    # The preflight's head (cut_short_in_head): it proves nothing, pg_restore --list says the rest.
    assert _problem(tmp_path, data[:200], size=len(data) * 2) is None


# --- What held: the block walk -----------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8, 32])
def test_whole_archives_of_any_int_size_pass_and_every_cut_is_found(tmp_path, k):
    data = _table_block(1, [b"abc", b"d" * 200], k) + _blobs_block(
        2, [(7, [b"lo"]), (8, []), (9, [b"x"] * 3)], k
    )
    data += _table_block(3, [], k)
    whole = _archive(k, [1, 2, 3], data)
    assert _problem(tmp_path, whole) is None
    missed = [n for n in range(len(whole) - len(data), len(whole)) if _problem(tmp_path, whole[:n]) is None]
    assert not missed


def test_an_archive_ending_at_a_block_boundary_misses_the_later_blocks(tmp_path):
    blocks = [_table_block(1, [b"a"], 4), _table_block(2, [b"b"], 4)]
    whole = _archive(4, [1, 2], b"".join(blocks))
    assert "is not in it" in _problem(tmp_path, whole[: len(whole) - len(blocks[1])])
    assert "is not in it" in _problem(tmp_path, _archive(4, [1, 2], b""))  # no data section at all
    assert _problem(tmp_path, _archive(4, [1, 2], b"", flag=3)) is None  # entries without data


@pytest.mark.parametrize(
    "section",
    [
        bytes([1]) + _int(1, 4) + _int(-5, 4) + b"xxxxx" + _int(0, 4),  # negative chunk length
        bytes([1]) + _int(1, 4) + bytes([0]) + b"\xff" * 4 + _int(0, 4),  # 4 GB chunk in a small file
        bytes([7]) + _int(1, 4) + _int(0, 4),  # a block type neither 1 nor 3
        bytes([0]) + _int(1, 4) + _int(0, 4),
        bytes([3])
        + _int(1, 4)
        + b"".join(_int(oid, 4) + _int(0, 4) for oid in range(1, 2000)),  # oids, no end
    ],
    ids=["negative", "huge", "type7", "type0", "many-oids-unended"],
)
def test_damaged_blocks_answer_without_raising(tmp_path, section):
    _problem(tmp_path, _archive(4, [1], section))  # answers (a string or None): raises nothing


def test_header_only_and_empty_files(tmp_path):
    whole = _archive(4, [1], _table_block(1, [b"a"], 4))
    for n in (0, 1, 5, 11, 30):
        assert _problem(tmp_path, whole[:n]) is not None


# --- Found: the walk kept every page of the archive it touched -----------------------


def test_the_walk_keeps_a_bounded_part_of_the_archive_in_memory(tmp_path):
    """pg_dump writes chunks of about 4 kB, so walking their lengths touches every page
    of the mapped file, and each stayed in the worker's RSS until the walk ended: the
    bench saw a 291 MB worker for mix's 374 MB archive (the target: under 300 MB
    whatever the size). Measured in a process of its own: its peak RSS must not grow
    with the archive (160 MB here)."""
    k, chunk, count = 4, 4096, 40_000
    head = _archive(k, [1], b"")
    path = tmp_path / "upload"
    with open(path, "wb") as fh:
        fh.write(head + bytes([1]) + _int(1, k))
        for _ in range(count):
            fh.write(_int(chunk, k))
            fh.seek(chunk, 1)  # a hole: read back as zeros, without writing 160 MB
        fh.write(_int(0, k))
    probe = (
        "import resource, sys\n"
        "from stages.dumps.archivecheck import problem\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert problem(sys.argv[1], 'custom') is None\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    )
    grown_mb = int(done.stdout) / 1024
    assert grown_mb < 48, (
        f"the walk's peak RSS grew by {grown_mb:.0f} MB for a {path.stat().st_size >> 20} MB archive"
    )
