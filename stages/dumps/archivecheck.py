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
from typing import BinaryIO

from stages.dumps.archivetoc import (
    BLOCK,
    OFFSET_NOT_SET,
    OFFSET_SET,
    End,
    Reader,
    read_entries,
    read_header,
    read_toc,
    tar_member,
)
from stages.errors import PermanentError

_BLK_DATA, _BLK_BLOBS = 1, 3

ADVICE = "the file is cut short: upload it again (the whole file pg_dump wrote)"


class ArchiveCutShort(PermanentError):
    """The archive ends before its last member or data block: it was cut short."""


def _custom_blocks(reader: Reader) -> set[int]:
    """Walk the data blocks after the TOC to the end of the file; the dump ids seen.
    Raises End if the file ends inside a block."""
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


def _skip_chunks(reader: Reader) -> None:
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
        name, length = tar_member(header)
        if length is None:
            return f"the header of its member {name!r} is damaged"
        end = offset + BLOCK + length
        if end > size:
            return f"its member {name} needs {end:,} bytes, the file has {size:,}"
        offset = offset + BLOCK + (length + BLOCK - 1) // BLOCK * BLOCK


def _custom(fh: BinaryIO, size: int, *, whole: bool, available: int) -> str | None:
    reader = Reader(fh, available)
    try:
        version, _fmt, _compressed = read_header(reader)
        entries = read_entries(reader, version, custom=True)
    except End:
        if whole:
            return "it ends inside its table of contents"
        return None  # the head holds only part of the TOC: pg_restore --list says more
    except ValueError:
        return None  # damaged, not cut: pg_restore's own check names that
    beyond = [e for e in entries if e.offset_flag == OFFSET_SET and e.offset >= size]
    if beyond:
        return (
            f"the data of {_entries(len(beyond))} starts past its end "
            f"(at byte {max(e.offset for e in beyond):,}; the file has {size:,})"
        )
    if not whole:
        return None
    try:
        seen = _custom_blocks(reader)
    except End:
        return "it ends inside a block of table data"
    except ValueError:
        return None
    missing = [e for e in entries if e.offset_flag in (OFFSET_SET, OFFSET_NOT_SET) and e.dump_id not in seen]
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


def encoding_of(path: str) -> str:
    """The server encoding of the database an archive was dumped from (its ENCODING
    entry: "SET client_encoding = 'LATIN1';"): the encoding of every name and string
    in the archive. `path` is a custom or tar archive, or a directory-format dump.
    UTF8 when the archive does not say."""
    try:
        return read_toc(path).encoding
    except (End, ValueError):
        return "UTF8"
