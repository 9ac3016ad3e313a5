"""An archive's table of contents as pg_dump wrote it (pg_backup_archiver.c, ReadHead
and ReadToc), read from the file itself rather than from `pg_restore --list`.

The listing leaves out what the copy engine needs to schedule an upload's restore:
each entry's dependencies (which table an index or constraint belongs to), its COPY
statement (the columns its rows hold), its definition (a sequence's value) and where its
data lies (how large it is). Custom (`-Fc`) and tar (`-Ft`) archives, and a directory
dump's `toc.dat`, share this structure.

Everything read here is the uploader's text: callers parse it strictly and never run it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
MAGIC = b"PGDMP"
# pg_backup_archiver.h: ReadOffset's flags, and the archive formats.
OFFSET_NOT_SET, OFFSET_SET, NO_DATA = 1, 2, 3
ARCH_CUSTOM, ARCH_TAR = 1, 3
_CLIENT_ENCODING = re.compile(rb"SET client_encoding = '([A-Za-z0-9_]+)';")


class End(Exception):
    """The bytes ran out."""


@dataclass(frozen=True)
class ArchiveEntry:
    """One TOC entry. `catalog_id` is (catalog oid, object oid) on the source; `deps`
    the dump ids it depends on; `copy_statement` the `COPY … FROM stdin;` its data
    starts with (None without one: INSERT data, or no data); `offset_flag`/`offset`
    where a custom archive holds its data; `member` the tar member that does."""

    dump_id: int
    catalog_id: tuple[int, int]
    tag: bytes
    desc: str
    section: int
    definition: bytes | None
    copy_statement: bytes | None
    namespace: bytes | None
    deps: tuple[int, ...]
    offset_flag: int = 0
    offset: int = 0
    member: str | None = None


@dataclass(frozen=True)
class ArchiveToc:
    """`compressed`: whether the data blocks are compressed (their size on disk then
    understates what streams); `data_bytes`: each data entry's size in the file, by
    dump id, when the archive records where its data lies."""

    version: tuple[int, int, int]
    format: int
    compressed: bool
    entries: list[ArchiveEntry]
    data_bytes: dict[int, int]
    int_size: int = 4  # the bytes of an integer's value in its blocks (its header says)

    @property
    def encoding(self) -> str:
        """The server encoding of the database it was dumped from (its ENCODING entry:
        "SET client_encoding = 'LATIN1';"), in which every name and row is written;
        UTF8 when it does not say."""
        for entry in self.entries:
            found = _CLIENT_ENCODING.search(entry.definition or b"")
            if found:
                return found.group(1).decode("ascii")
        return "UTF8"


# A read this large or smaller is handed to read() unchecked: it allocates no more than this.
_SMALL_READ = 1 << 20


def signed(raw: bytes) -> int:
    """An integer as pg_dump writes it (WriteInt): a sign byte, then its value's bytes,
    least significant first."""
    value = int.from_bytes(raw[1:], "little")
    return -value if raw[0] else value


class Reader:
    """pg_dump's archive integers and strings (ReadInt, ReadStr, ReadOffset)."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self.fh = fh
        self.limit = limit  # bytes available (the head's size, or the whole file's)
        self.int_size = 4
        self.off_size = 8

    def take(self, count: int) -> bytes:
        if count > _SMALL_READ and count > self.limit - self.fh.tell():
            # More than the file holds (a length an uploaded file may claim): read() would
            # try to allocate it first (MemoryError), or refuse the number (OverflowError).
            # Only large lengths are checked: tell() at every read made reading the table
            # of contents of 2,000 tables two and a half times slower.
            raise End
        data = self.fh.read(count)
        if len(data) < count:
            raise End
        return data

    def byte(self) -> int:
        return self.take(1)[0]

    def integer(self) -> int:
        return signed(self.take(1 + self.int_size))

    def string(self) -> bytes | None:
        length = self.integer()
        if length < 0:
            return None
        return self.take(length)

    def skip(self, count: int) -> None:
        position = self.fh.tell() + count
        if position > self.limit:
            raise End
        self.fh.seek(position)


def read_header(reader: Reader) -> tuple[tuple[int, int, int], int, bool]:
    """Read the archive header (ReadHead): its version, format code and whether its
    data is compressed."""
    if reader.take(len(MAGIC)) != MAGIC:
        raise ValueError("not a pg_dump archive")
    vmaj, vmin = reader.byte(), reader.byte()
    version = (vmaj, vmin, reader.byte() if (vmaj, vmin) > (1, 0) else 0)
    reader.int_size = reader.byte()
    if version >= (1, 7, 0):
        reader.off_size = reader.byte()
    fmt = reader.byte()
    compressed = True
    if version >= (1, 15, 0):
        compressed = reader.byte() != 0  # the algorithm: 0 is none
    elif version >= (1, 4, 0):
        compressed = reader.integer() != 0  # the level: 0 is none, -1 the default
    elif version >= (1, 2, 0):
        compressed = reader.byte() != 0
    if version >= (1, 4, 0):
        for _ in range(7):
            reader.integer()
        reader.string()
    if version >= (1, 10, 0):
        reader.string()
        reader.string()
    return version, fmt, compressed


def read_entries(reader: Reader, version: tuple[int, int, int], custom: bool) -> list[ArchiveEntry]:
    """The TOC entries (ReadToc), with their data offsets when `custom`."""
    entries = []
    count = reader.integer()
    if count < 0:  # pg_restore lists such a file as empty: restored, it would replace a database with nothing
        raise ValueError(f"its table of contents says it holds {count} entries: it is damaged")
    for _ in range(count):
        dump_id = reader.integer()
        reader.integer()  # hadDumper
        table_oid = reader.string() if version >= (1, 8, 0) else b"0"
        oid = reader.string()
        tag = reader.string() or b""
        desc = (reader.string() or b"").decode("utf-8", "replace")
        section = reader.integer() if version >= (1, 11, 0) else 0
        definition = reader.string()
        reader.string()  # drop statement
        copy_statement = reader.string() if version >= (1, 3, 0) else None
        namespace = reader.string() if version >= (1, 6, 0) else None
        if version >= (1, 10, 0):
            reader.string()  # tablespace
        if version >= (1, 14, 0):
            reader.string()  # table access method
        if version >= (1, 16, 0):
            reader.integer()  # relkind
        reader.string()  # owner
        if version >= (1, 9, 0):
            reader.string()  # "with oids"
        deps: list[int] = []
        if version >= (1, 5, 0):
            while (dep := reader.string()) is not None:  # ended by a NULL string
                deps.append(_number(dep))
        flag = offset = 0
        member = None
        if custom:
            flag = reader.byte()
            offset = int.from_bytes(reader.take(reader.off_size), "little")
        else:
            found = reader.string()  # tar: the member holding the entry's data
            member = found.decode("ascii", "replace") if found else None
        entries.append(
            ArchiveEntry(
                dump_id,
                (_number(table_oid), _number(oid)),
                tag,
                desc,
                section,
                definition,
                copy_statement or None,
                namespace,
                tuple(deps),
                flag,
                offset,
                member,
            )
        )
    return entries


def _number(text: bytes | None) -> int:
    try:
        return int(text or b"0")
    except ValueError:
        return 0


def read_toc(path: str, *, size: int | None = None) -> ArchiveToc:
    """The table of contents of the custom or tar archive at `path` (or a directory
    dump). Raises ValueError if it is not one or is damaged, End if it is cut short
    inside its table of contents (or `path` holds only part of it).

    `size`: the whole custom archive's size when `path` holds only its first bytes (its
    table of contents whole): the last block's size is measured to the archive's end."""
    directory = os.path.isdir(path)
    toc_path = os.path.join(path, "toc.dat") if directory else path
    available = os.path.getsize(toc_path)
    with open(toc_path, "rb") as fh:
        tar = fh.read(len(MAGIC)) != MAGIC
        fh.seek(BLOCK if tar else 0)  # tar: the first member, toc.dat, follows its header
        reader = Reader(fh, available)
        version, fmt, compressed = read_header(reader)
        custom = fmt == ARCH_CUSTOM and not directory
        entries = read_entries(reader, version, custom)
        if custom:
            sizes = _custom_sizes(entries, available if size is None else size)
        elif tar:
            sizes = _tar_sizes(fh, available, entries)
        else:
            sizes = {}
    return ArchiveToc(version, fmt, compressed, entries, sizes, reader.int_size)


def _custom_sizes(entries: list[ArchiveEntry], size: int) -> dict[int, int]:
    """Each data block's size: from its offset to the next block's (or the file's end)."""
    placed = sorted(
        (e.offset, e.dump_id) for e in entries if e.offset_flag == OFFSET_SET and 0 < e.offset <= size
    )
    ends = [offset for offset, _ in placed[1:]] + [size] if placed else []
    return {dump_id: end - offset for (offset, dump_id), end in zip(placed, ends, strict=True)}


def tar_member(header: bytes) -> tuple[str, int | None]:
    """A tar header's member name and size (None when the size field is damaged):
    octal text, or base-256 when its first byte has the high bit set."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    raw = header[124:136]
    try:
        return name, int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(
            raw.split(b"\0", 1)[0].strip() or b"0", 8
        )
    except ValueError:
        return name, None


def _tar_sizes(fh: BinaryIO, size: int, entries: list[ArchiveEntry]) -> dict[int, int]:
    """Each data member's size, from the tar headers."""
    members: dict[str, int] = {}
    offset = 0
    while offset + BLOCK <= size:
        fh.seek(offset)
        header = fh.read(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            break
        name, length = tar_member(header)
        if length is None:
            break
        members[name] = length
        offset += BLOCK + (length + BLOCK - 1) // BLOCK * BLOCK
    return {e.dump_id: members[e.member] for e in entries if e.member and e.member in members}
