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

`check_complete` walks the whole file (the worker, before the restore; a custom
archive's blocks are read from a mapping of the file, only where each chunk's length
lies); `cut_short_in_head` needs only the first bytes and the object's size (the
upload preflight): a data offset or a tar member reaching past the end of the object
proves it was cut. The data itself is never read, nor decompressed.

`await_block` follows one data block as its bytes arrive (an archive restored while it
downloads): how far pg_restore will read for that block.

`encoding_of` reads the same table of contents for the source database's encoding,
in which every name and row of the archive is written.
"""

from __future__ import annotations

import mmap
import os
from typing import BinaryIO, Protocol

from stages.dumps.archivetoc import (
    BLOCK,
    OFFSET_NOT_SET,
    OFFSET_SET,
    End,
    Reader,
    read_entries,
    read_header,
    read_toc,
    signed,
    tar_member,
)
from stages.errors import PermanentError

_BLK_DATA, _BLK_BLOBS = 1, 3

ADVICE = "the file is cut short: upload it again (the whole file pg_dump wrote)"


class ArchiveCutShort(PermanentError):
    """The archive ends before its last member or data block: it was cut short."""


def _custom_blocks(reader: Reader) -> set[int]:
    """Walk the data blocks after the TOC to the end of the file; the dump ids seen.
    Raises End if the file ends inside a block.

    The file is mapped, not read: a block is chunks of a few kilobytes one after another
    (392 MB of data hold about 96,000), and a seek and two small reads per chunk took
    0.4-0.5 s there, reading each length out of the mapping a third of that."""
    start = reader.fh.tell()
    if start >= reader.limit:
        return set()
    with mmap.mmap(reader.fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return _BlockWalk(mapped, start, min(reader.limit, len(mapped)), reader.int_size).blocks()


# The pages of the mapping walked past are handed back this often: chunks of about 4 kB
# touch every page, and each would count in the worker's RSS until the walk ended (the
# whole archive, for a large one).
RELEASE_BYTES = 16 << 20


class _BlockWalk:
    """pg_dump's data blocks (WriteDataChunks, _PrintData), read from `data` from
    `position` up to `limit`: each is its type, its dump id, then its chunks (each its
    length, then that many bytes; a zero length ends the block). The pages behind the
    walk are released as it goes (RELEASE_BYTES): it holds a bounded part of the file."""

    def __init__(self, data: mmap.mmap, position: int, limit: int, int_size: int) -> None:
        self.data, self.position, self.limit, self.int_size = data, position, limit, int_size
        self.release_at = position + RELEASE_BYTES

    def release(self) -> None:
        """Drop the pages before the current position from this process (they stay in
        the page cache, and are read again if touched)."""
        upto = self.position - self.position % mmap.PAGESIZE  # within the file: at most `limit`
        if upto > 0:
            self.data.madvise(mmap.MADV_DONTNEED, 0, upto)
        self.release_at = self.position + RELEASE_BYTES

    def blocks(self) -> set[int]:
        seen: set[int] = set()
        while self.position < self.limit:
            kind = self.data[self.position]
            self.position += 1
            dump_id = self.integer()
            if kind == _BLK_DATA:
                self.skip_chunks()
            elif kind == _BLK_BLOBS:
                while self.integer() != 0:  # each large object: its oid, then its chunks
                    self.skip_chunks()
            else:
                raise ValueError(f"unknown block type {kind}")
            seen.add(dump_id)
        return seen

    def integer(self) -> int:
        """ReadInt: a sign byte, then `int_size` bytes, least significant first."""
        start, end = self.position, self.position + 1 + self.int_size
        if end > self.limit:
            raise End
        self.position = end
        return signed(self.data[start:end])

    def skip_chunks(self) -> None:
        while (length := self.integer()) != 0:
            if length < 0:
                raise ValueError("negative chunk length")
            self.position += length
            if self.position > self.limit:
                raise End
            if self.position >= self.release_at:
                self.release()


class Arriving(Protocol):
    """An archive that may still be arriving (a download): how much of it is on disk."""

    @property
    def complete(self) -> bool:
        """The whole archive is on disk."""

    def wait_for(self, end: int | None) -> None:
        """Return once the archive's first `end` bytes (None: all of it) are on disk;
        raise what ended its arrival short of them."""


def await_block(path: str, offset: int, int_size: int, arriving: Arriving) -> None:
    """Return once the custom archive's data block at `offset` is on disk whole, as
    pg_restore reads it (_PrintTocData: its type and dump id, then each chunk's length
    and bytes to a zero length): its chunks are followed as they arrive, whatever the
    table of contents says of the next block. What is not a table's data block there
    (a crafted offset) is waited for whole: pg_restore reads it as it would read it
    from the whole file. Returns at once when the archive is complete."""
    with open(path, "rb", buffering=0) as fh:
        position = offset

        def integer() -> int:
            nonlocal position
            end = position + 1 + int_size
            arriving.wait_for(end)
            raw = os.pread(fh.fileno(), 1 + int_size, position)
            if len(raw) < 1 + int_size:
                raise End
            position = end
            return signed(raw)

        try:
            arriving.wait_for(position + 1)
            if arriving.complete:
                return
            if os.pread(fh.fileno(), 1, position) != bytes([_BLK_DATA]):
                raise ValueError("not a data block")
            position += 1
            integer()  # its dump id (pg_restore names a wrong one)
            while not arriving.complete:
                length = integer()
                if length == 0:
                    return
                if length < 0:
                    raise ValueError("negative chunk length")
                position += length
        except (End, ValueError):
            arriving.wait_for(None)


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
