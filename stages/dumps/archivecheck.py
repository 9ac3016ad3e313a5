"""Is an archive whole? Decided from its structure, before pg_restore reads it.

pg_restore trusts an archive's structure: a tar archive cut short can make
`pg_restore --data-only` loop without end, and a custom archive cut at a block boundary
restores without some tables' data. So both formats are walked here first:

- tar (`pg_dump -Ft`): every member's header and size must fit in the file, and the
  archive must end with the two zero blocks pg_dump writes after its last member;
- custom (`pg_dump -Fc`): the table of contents is read (pg_backup_archiver.c,
  ReadToc), then every data block after it is walked chunk by chunk (each chunk is its
  length, then that many bytes; a zero length ends a block); the file must end after
  a whole block, and every entry that has data must have its block.

`check_complete` reads the whole file (the worker, before the restore);
`cut_short_in_head` needs only the first bytes and the object's size (the upload
preflight): a data offset or a tar member reaching past the end of the object proves
it was cut. Only seeks and small reads: the data itself is never decompressed.

`encoding_of` reads the same table of contents for the source database's encoding,
in which every name and row of the archive is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO

from stages.errors import PermanentError

BLOCK = 512
_MAGIC = b"PGDMP"
# pg_backup_archiver.h: ReadOffset's flags, and the custom format's block types.
_OFFSET_NOT_SET, _OFFSET_SET, _NO_DATA = 1, 2, 3
_BLK_DATA, _BLK_BLOBS = 1, 3
_ARCH_CUSTOM = 1

ADVICE = "the file is cut short: upload it again (the whole file pg_dump wrote)"


class ArchiveCutShort(PermanentError):
    """The archive ends before its last member or data block: it was cut short."""


class _End(Exception):
    """The bytes ran out."""


@dataclass(frozen=True)
class _Entry:
    dump_id: int
    desc: str
    offset_flag: int  # custom format only (0 for tar)
    offset: int
    definition: bytes | None = None


class _Reader:
    """pg_dump's archive integers and strings (ReadInt, ReadStr, ReadOffset)."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self.fh = fh
        self.limit = limit  # bytes available (the head's size, or the whole file's)
        self.int_size = 4
        self.off_size = 8

    def take(self, count: int) -> bytes:
        data = self.fh.read(count)
        if len(data) < count:
            raise _End
        return data

    def byte(self) -> int:
        return self.take(1)[0]

    def integer(self) -> int:
        negative = self.byte() != 0
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if negative else value

    def string(self) -> bytes | None:
        length = self.integer()
        if length < 0:
            return None
        return self.take(length)

    def skip(self, count: int) -> None:
        position = self.fh.tell() + count
        if position > self.limit:
            raise _End
        self.fh.seek(position)


def _header(reader: _Reader) -> tuple[tuple[int, int, int], int]:
    """Read the archive header (ReadHead); returns its version and format code."""
    if reader.take(len(_MAGIC)) != _MAGIC:
        raise ValueError("not a pg_dump archive")
    vmaj, vmin = reader.byte(), reader.byte()
    version = (vmaj, vmin, reader.byte() if (vmaj, vmin) > (1, 0) else 0)
    reader.int_size = reader.byte()
    if version >= (1, 7, 0):
        reader.off_size = reader.byte()
    fmt = reader.byte()
    if version >= (1, 15, 0):
        reader.byte()
    elif version >= (1, 4, 0):
        reader.integer()
    elif version >= (1, 2, 0):
        reader.byte()
    if version >= (1, 4, 0):
        for _ in range(7):
            reader.integer()
        reader.string()
    if version >= (1, 10, 0):
        reader.string()
        reader.string()
    return version, fmt


def _toc(reader: _Reader, version: tuple[int, int, int], custom: bool) -> list[_Entry]:
    """The TOC entries (ReadToc), with their data offsets when `custom`."""
    entries = []
    for _ in range(reader.integer()):
        dump_id = reader.integer()
        reader.integer()  # hadDumper
        if version >= (1, 8, 0):
            reader.string()  # table oid
        reader.string()  # oid
        reader.string()  # tag
        desc = (reader.string() or b"").decode("utf-8", "replace")
        if version >= (1, 11, 0):
            reader.integer()  # section
        definition = reader.string()
        reader.string()  # drop statement
        if version >= (1, 3, 0):
            reader.string()  # copy statement
        if version >= (1, 6, 0):
            reader.string()  # namespace
        if version >= (1, 10, 0):
            reader.string()  # tablespace
        if version >= (1, 14, 0):
            reader.string()  # table access method
        if version >= (1, 16, 0):
            reader.integer()  # relkind
        reader.string()  # owner
        if version >= (1, 9, 0):
            reader.string()  # "with oids"
        if version >= (1, 5, 0):
            while reader.string() is not None:  # dependencies, ended by a NULL string
                pass
        flag = offset = 0
        if custom:
            flag = reader.byte()
            offset = int.from_bytes(reader.take(reader.off_size), "little")
        else:
            reader.string()  # tar: the member holding the entry's data
        entries.append(_Entry(dump_id, desc, flag, offset, definition if desc == "ENCODING" else None))
    return entries


def _custom_blocks(reader: _Reader) -> set[int]:
    """Walk the data blocks after the TOC to the end of the file; the dump ids seen.
    Raises _End if the file ends inside a block."""
    seen: set[int] = set()
    while reader.fh.tell() < reader.limit:
        kind = reader.byte()
        dump_id = reader.integer()
        if kind == _BLK_DATA:
            _skip_chunks(reader)
        elif kind == _BLK_BLOBS:
            while reader.integer() != 0:  # each large object: its oid, then its chunks
                _skip_chunks(reader)
        else:
            raise ValueError(f"unknown block type {kind}")
        seen.add(dump_id)
    return seen


def _skip_chunks(reader: _Reader) -> None:
    while (length := reader.integer()) != 0:
        if length < 0:
            raise ValueError("negative chunk length")
        reader.skip(length)


def _tar_members(fh: BinaryIO, size: int, *, whole: bool) -> str | None:
    """Walk a tar archive's member headers; what is wrong if it was cut short, else
    None. With `whole` False only what lies in the first bytes is judged."""
    offset = 0
    while True:
        fh.seek(offset)
        header = fh.read(BLOCK)
        if len(header) < BLOCK:
            if whole:
                return "it ends without the end-of-archive blocks a tar archive has"
            return None
        if header == bytes(BLOCK):
            if not whole:
                return None
            if fh.read(BLOCK) != bytes(BLOCK):
                return "it ends without the end-of-archive blocks a tar archive has"
            return None
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        raw = header[124:136]
        try:
            length = (
                int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
            )
        except ValueError:
            return f"the header of its member {name!r} is damaged"
        end = offset + BLOCK + length
        if end > size:
            return f"its member {name} needs {end:,} bytes, the file has {size:,}"
        offset = offset + BLOCK + (length + BLOCK - 1) // BLOCK * BLOCK


def _custom(fh: BinaryIO, size: int, *, whole: bool, available: int) -> str | None:
    reader = _Reader(fh, available)
    try:
        version, _fmt = _header(reader)
        entries = _toc(reader, version, custom=True)
    except _End:
        if whole:
            return "it ends inside its table of contents"
        return None  # the head holds only part of the TOC: pg_restore --list says more
    except ValueError:
        return None  # damaged, not cut: pg_restore's own check names that
    beyond = [e for e in entries if e.offset_flag == _OFFSET_SET and e.offset >= size]
    if beyond:
        return (
            f"the data of {_entries(len(beyond))} starts past its end "
            f"(at byte {max(e.offset for e in beyond):,}; the file has {size:,})"
        )
    if not whole:
        return None
    try:
        seen = _custom_blocks(reader)
    except _End:
        return "it ends inside a block of table data"
    except ValueError:
        return None
    missing = [e for e in entries if e.offset_flag in (_OFFSET_SET, _OFFSET_NOT_SET) and e.dump_id not in seen]
    if missing:
        return f"the data of {_entries(len(missing))} ({', '.join(sorted({e.desc for e in missing}))}) is not in it"
    return None


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def problem(path: str, fmt: str, *, size: int | None = None) -> str | None:
    """Why the archive at `path` is cut short, or None. `size`: the size of the whole
    object when `path` holds only its first bytes (then only what they prove counts)."""
    available = os.path.getsize(path)
    whole = size is None or available >= size
    total = available if size is None else size
    with open(path, "rb") as fh:
        if fmt == "tar":
            return _tar_members(fh, total, whole=whole)
        if fmt == "custom":
            return _custom(fh, total, whole=whole, available=available)
    return None


def message(fmt: str, why: str) -> str:
    kind = {"tar": "tar archive (-Ft)", "custom": "custom-format archive (-Fc)"}.get(fmt, "archive")
    return f"the {kind} is incomplete: {why}; {ADVICE}"


def check_complete(path: str, fmt: str) -> None:
    """Raise ArchiveCutShort, naming what is missing, if the archive was cut short."""
    why = problem(path, fmt)
    if why is not None:
        raise ArchiveCutShort(message(fmt, why))


def cut_short_in_head(head_path: str, fmt: str, size: int) -> str | None:
    """The message for an upload whose first bytes (`head_path`) prove that the
    object of `size` bytes was cut short; None when they do not."""
    why = problem(head_path, fmt, size=size)
    return None if why is None else message(fmt, why)


_CLIENT_ENCODING = re.compile(rb"SET client_encoding = '([A-Za-z0-9_]+)';")


def encoding_of(path: str) -> str:
    """The server encoding of the database an archive was dumped from (its ENCODING
    entry: "SET client_encoding = 'LATIN1';"): the encoding of every name and string
    in the archive. `path` is a custom or tar archive, or a directory-format dump.
    UTF8 when the archive does not say."""
    toc_path, start = (os.path.join(path, "toc.dat"), 0) if os.path.isdir(path) else (path, 0)
    with open(toc_path, "rb") as fh:
        if fh.read(len(_MAGIC)) != _MAGIC:
            start = BLOCK  # tar: the first member, toc.dat, follows its header
        fh.seek(start)
        reader = _Reader(fh, os.path.getsize(toc_path))
        try:
            version, fmt = _header(reader)
            entries = _toc(reader, version, custom=fmt == _ARCH_CUSTOM and not os.path.isdir(path))
        except (_End, ValueError):
            return "UTF8"
    for entry in entries:
        found = _CLIENT_ENCODING.search(entry.definition or b"")
        if found:
            return found.group(1).decode("ascii")
    return "UTF8"
