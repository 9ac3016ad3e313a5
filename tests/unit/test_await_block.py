"""How far pg_restore reads for one data block of a custom archive that is still
arriving (stages.dumps.archivecheck.await_block): to the block's zero-length chunk,
followed as the chunks arrive, whatever the table of contents says of the next block."""

from __future__ import annotations

import pytest

from stages.dumps.archivecheck import await_block

INT = 4


def _int(value: int) -> bytes:
    return bytes([value < 0]) + abs(value).to_bytes(INT, "little")


def _block(dump_id: int, *chunks: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + _int(dump_id) + b"".join(_int(len(c)) + c for c in chunks) + _int(0)


class Arriving:
    """The file's first bytes arrive as they are asked for; records the largest ask."""

    def __init__(self, size: int) -> None:
        self.size, self.asked, self.whole = size, 0, False

    @property
    def complete(self) -> bool:
        return self.whole

    def wait_for(self, end: int | None) -> None:
        if end is None:
            self.whole = True
            self.asked = self.size
        else:
            self.asked = max(self.asked, min(end, self.size))


def test_the_wait_ends_with_the_blocks_last_chunk_not_at_the_next_offset(tmp_path):
    first = _block(7, b"a" * 3000, b"b" * 5000)
    data = b"HEAD" + first + _block(8, b"c" * 9000)
    path = tmp_path / "archive"
    path.write_bytes(data)
    arriving = Arriving(len(data))
    await_block(str(path), 4, INT, arriving)
    assert arriving.asked == 4 + len(first) and not arriving.whole


@pytest.mark.parametrize(
    "garbage",
    [_block(9, b"x" * 10, kind=3), bytes([1]) + _int(9) + _int(-5), bytes([1]) + _int(9) + _int(10_000)],
    ids=["not a data block", "negative chunk", "a chunk past the end"],
)
def test_what_is_not_a_whole_data_block_is_waited_for_whole(tmp_path, garbage):
    data = b"HEAD" + garbage + b"tail" * 10
    path = tmp_path / "archive"
    path.write_bytes(data)
    arriving = Arriving(len(data))
    await_block(str(path), 4, INT, arriving)
    assert arriving.whole


def test_a_complete_archive_is_not_walked(tmp_path):
    path = tmp_path / "archive"
    path.write_bytes(b"HEAD" + _block(7, b"a" * 10))
    arriving = Arriving(len(path.read_bytes()))
    arriving.whole = True
    await_block(str(path), 4, INT, arriving)
    assert arriving.asked <= 5
