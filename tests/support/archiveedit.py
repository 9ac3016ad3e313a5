"""In-place edits of a custom archive's table of contents, for hostile-archive tests:
same-length byte edits keep every data offset valid (layout: stages.dumps.archivetoc)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages.dumps.archivetoc import MAGIC, Reader, read_header


@dataclass
class Placed:
    """Where an entry's fields lie in the file: (offset, length) of each string."""

    dump_id: int
    desc: str
    strings: dict[str, tuple[int, int]] = field(default_factory=dict)
    deps: list[tuple[int, int]] = field(default_factory=list)


def placed_entries(path: Path) -> list[Placed]:
    """A PG 15 (archive 1.14) custom archive's entries, with where each field lies."""
    with open(path, "rb") as fh:
        assert fh.read(len(MAGIC)) == MAGIC
        fh.seek(0)
        reader = Reader(fh, path.stat().st_size)
        version, _fmt, _compressed = read_header(reader)
        assert version[:2] == (1, 14), version

        def string() -> tuple[int, int] | None:
            length = reader.integer()
            if length < 0:
                return None
            start = fh.tell()
            reader.take(length)
            return start, length

        out = []
        for _ in range(reader.integer()):
            dump_id = reader.integer()
            reader.integer()
            placed = Placed(dump_id, "")
            for name in (
                "table_oid",
                "oid",
                "tag",
                "desc",
                "definition",
                "drop",
                "copy",
                "namespace",
                "tablespace",
                "tableam",
                "owner",
                "withoids",
            ):
                if name == "definition":
                    reader.integer()  # the section
                where = string()
                if where is not None:
                    placed.strings[name] = where
                if name == "desc":
                    assert where is not None
                    position = fh.tell()
                    fh.seek(where[0])
                    placed.desc = fh.read(where[1]).decode()
                    fh.seek(position)
            while (dep := string()) is not None:
                placed.deps.append(dep)
            reader.byte()
            reader.take(reader.off_size)
            out.append(placed)
        return out


def field_text(path: Path, where: tuple[int, int]) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(where[0])
        return fh.read(where[1])


def overwrite(path: Path, where: tuple[int, int], text: bytes) -> None:
    """Replace a field with text of the same length."""
    assert len(text) == where[1], (text, where)
    with open(path, "r+b") as fh:
        fh.seek(where[0])
        fh.write(text)


def find(path: Path, desc: str, tag: bytes) -> Placed:
    for placed in placed_entries(path):
        if placed.desc == desc and field_text(path, placed.strings["tag"]) == tag:
            return placed
    raise LookupError((desc, tag))
