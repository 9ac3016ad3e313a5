"""Recognise an uploaded dump from its first few KiB, without trusting its name.

`detect_format` answers which pg_dump output a file is — custom (``-Fc``), tar
(``-Ft``), plain SQL (``-Fp``) or plain SQL compressed with gzip — and, when the file
says so, which archive format version it uses, which pg_dump made it and which server
it was dumped from. Anything else raises `UnrecognizedDump` with a message naming
what was found, because that message is shown to the user as the job's error. Common
near-misses are named with the pg_dump command to use instead: a tar, zip or gzipped
tar of a directory-format (``-Fd``) dump, a UTF-16 file (Windows PowerShell's ``>``
redirect) and pg_dumpall output.
"""

from __future__ import annotations

import codecs
import os
import re
import zlib
from dataclasses import dataclass

from stages.dumps.plaindump import dumpall_message
from stages.errors import UnrecognizedDump

HEAD_BYTES = 8192
ADVICE = "upload a file made by pg_dump -Fc, -Ft or plain SQL"

# ArchiveFormat codes from pg_dump's pg_backup.h. A directory-format dump writes the
# tar code into its toc.dat (pg_backup_directory.c, _CloseArchive).
_ARCH_CUSTOM = 1
_ARCH_TAR = 3
_MAGIC = b"PGDMP"
_TAR_MAGIC_AT = slice(257, 262)
_TAR_BLOCK = 512

_FOREIGN = (
    (b"PK\x03\x04", "a zip archive", False),
    (b"PK\x05\x06", "a zip archive", False),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", False),
    (b"Rar!\x1a\x07", "a RAR archive", False),
    (b"SQLite format 3\x00", "an SQLite database", False),
    (b"BZh", "bzip2-compressed", True),
    (b"\xfd7zXZ\x00", "xz-compressed", True),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", True),
    (b"\x04\x22\x4d\x18", "lz4-compressed", True),
)
# How a pg_dump / pg_dumpall SQL script can begin (after blank lines). pg_dump since
# 17.6/16.10/15.14/14.19/13.22 emits a `\restrict` line near the top.
_SQL_STARTS = re.compile(r"(--|/\*|\\connect\b|\\restrict\b|(SET|CREATE|SELECT|BEGIN)\b)", re.I)
_DUMPED_FROM = re.compile(r"^-- Dumped from database version (.+?)\s*$", re.M)
_DUMPED_BY = re.compile(r"^-- Dumped by pg_dump version (.+?)\s*$", re.M)
_CLIENT_ENCODING = re.compile(rb"^SET client_encoding = '([A-Za-z0-9_]+)';", re.M)
_CLUSTER_DUMP = re.compile(r"^--[ \t]*PostgreSQL database cluster dump[ \t]*\r?$", re.M)
# The files of a directory-format dump (pg_backup_directory.c): toc.dat, one NNNN.dat
# per table (compressed: .dat.gz, .lz4, .zst) and blobs.toc / blob_NNNN.dat.
_DIRECTORY_MEMBER = re.compile(
    r"(?:^|/)(?:toc\.dat|\d+\.dat(?:\.gz|\.lz4|\.zst)?|blobs\.toc|blob_\d+\.dat(?:\.gz)?)$"
)
SINGLE_FILE = "pg_dump -Fc -f dump.dump DBNAME (or pg_dump -Ft -f dump.tar DBNAME)"
UTF16 = (
    "the upload is UTF-16 text, as Windows PowerShell writes the output of pg_dump ... > dump.sql; "
    "let pg_dump write the file itself instead of redirecting its output, e.g. pg_dump -Fc -f "
    "dump.dump DBNAME (or pg_dump -Fp -f dump.sql DBNAME), and upload that file"
)


@dataclass(frozen=True)
class DumpInfo:
    """What kind of pg_dump output a file is. `format` is one of ``custom``, ``tar``,
    ``plain``, ``gzip-plain``; the version fields are None when the file does not say."""

    format: str
    archive_version: str | None = None
    dumped_by: str | None = None
    dumped_from: str | None = None


def detect_format(path: str | os.PathLike[str]) -> DumpInfo:
    """Identify the dump at `path` from its first `HEAD_BYTES` bytes.

    Raises `UnrecognizedDump` for anything that is not a pg_dump custom, tar or plain
    output (empty, zip, other compression, a directory-format toc.dat, random bytes).
    """
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    complete = len(head) < HEAD_BYTES
    if not head:
        raise UnrecognizedDump("the upload is empty")
    if _utf16(head):
        raise UnrecognizedDump(UTF16)
    if head.startswith(_MAGIC):
        return _archive(head, 0, complete)
    if head[_TAR_MAGIC_AT] == b"ustar":
        return _tar(head, complete)
    if head.startswith(b"\x1f\x8b"):
        return _gzip(head)
    if head.startswith(b"PK\x03\x04") and _zip_of_directory(head):
        raise UnrecognizedDump(_directory_message("a zip archive"))
    for magic, what, compressed in _FOREIGN:
        if head.startswith(magic):
            if compressed:
                raise UnrecognizedDump(
                    f"the upload is {what}; decompress it and upload the pg_dump output "
                    "itself (only plain SQL may be gzip-compressed)"
                )
            raise UnrecognizedDump(f"the upload is {what}, not a pg_dump output; {ADVICE}")
    text, problem = _sql_text(head)
    if text is None:
        raise UnrecognizedDump(f"the upload {problem}; {ADVICE}")
    return DumpInfo("plain", None, _search(_DUMPED_BY, text), _search(_DUMPED_FROM, text))


def _archive(head: bytes, start: int, complete: bool) -> DumpInfo:
    """Parse the archive header as pg_restore's ReadHead (pg_backup_archiver.c) does."""
    try:
        version, fmt, dumped_from, dumped_by = _read_header(head, start)
    except _Truncated:
        if complete:
            raise UnrecognizedDump(
                "the upload starts like a pg_dump archive but ends inside its header; "
                "it looks truncated, upload the whole file"
            ) from None
        raise UnrecognizedDump("the upload starts like a pg_dump archive but its header is damaged") from None
    except _Damaged as err:
        raise UnrecognizedDump(
            f"the upload starts like a pg_dump archive but its header is damaged ({err})"
        ) from None
    if start == 0 and fmt == _ARCH_TAR:
        raise UnrecognizedDump(
            "the upload is the toc.dat of a directory-format (-Fd) dump, not a whole dump; "
            "upload a single file made by pg_dump -Fc or -Ft"
        )
    expected = _ARCH_CUSTOM if start == 0 else _ARCH_TAR
    if fmt != expected:
        raise UnrecognizedDump(
            f"the upload starts like a pg_dump archive but its format code {fmt} is not "
            f"one pg_restore reads from a single file; {ADVICE}"
        )
    return DumpInfo("custom" if start == 0 else "tar", ".".join(map(str, version)), dumped_by, dumped_from)


def _tar(head: bytes, complete: bool) -> DumpInfo:
    # pg_dump -Ft always writes toc.dat first, and it starts with the archive header.
    first = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if first != "toc.dat" or not head[_TAR_BLOCK:].startswith(_MAGIC):
        if first != "toc.dat" and _tar_of_directory(head):
            raise UnrecognizedDump(_directory_message("a tar archive"))
        raise UnrecognizedDump(
            f"the upload is a tar archive but not one made by pg_dump -Ft (its first "
            f"member is {first[:60]!r}, not toc.dat); {ADVICE}"
        )
    return _archive(head, _TAR_BLOCK, complete)


def _gzip(head: bytes) -> DumpInfo:
    try:
        # max_length bounds the output: a small prefix must not inflate into gigabytes.
        inner = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(head, HEAD_BYTES)
    except zlib.error:
        raise UnrecognizedDump(f"the upload is gzip-compressed but its data is damaged; {ADVICE}") from None
    if not inner:
        raise UnrecognizedDump("the upload is gzip-compressed but empty inside")
    if inner.startswith(_MAGIC):
        raise UnrecognizedDump(
            "the upload is a gzip-compressed pg_dump archive; custom archives are already "
            "compressed, so upload the file pg_dump -Fc made without gzipping it"
        )
    if inner[_TAR_MAGIC_AT] == b"ustar":
        if _tar_of_directory(inner):
            raise UnrecognizedDump(_directory_message("a gzip-compressed tar archive"))
        raise UnrecognizedDump(
            "the upload is a gzip-compressed tar archive; upload the file pg_dump -Ft "
            "made without compressing it"
        )
    if _utf16(inner):
        raise UnrecognizedDump(UTF16)
    text, problem = _sql_text(inner)
    if text is None:
        raise UnrecognizedDump(f"the upload is gzip-compressed, but inside it {problem}; {ADVICE}")
    return DumpInfo("gzip-plain", None, _search(_DUMPED_BY, text), _search(_DUMPED_FROM, text))


def _sql_text(data: bytes) -> tuple[str | None, str]:
    """The chunk as text if it looks like the start of a SQL script, else (None, why)."""
    data = data.removeprefix(codecs.BOM_UTF8)
    if b"\0" in data:
        return None, f"starts with bytes {_hex(data)} that are not a pg_dump format"
    try:
        # final=False: the chunk may end in the middle of a multi-byte character.
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        # A dump of a LATIN1 (etc.) database is in that encoding and says so near the top.
        declared = _CLIENT_ENCODING.search(data)
        if declared is None or declared.group(1).upper() in (b"UTF8", b"UTF-8", b"UNICODE"):
            return None, (f"starts with bytes {_hex(data)} that are not a pg_dump format (not UTF-8 text)")
        text = data.decode("latin-1")
    first_line = text.lstrip().split("\n", 1)[0].strip()
    if not _SQL_STARTS.match(first_line):
        return None, (
            f"is text but does not look like a pg_dump SQL script (it starts with {first_line[:40]!r})"
        )
    if _CLUSTER_DUMP.search(text):
        raise UnrecognizedDump(dumpall_message())
    return text, ""


def _utf16(data: bytes) -> bool:
    """A byte-order mark of UTF-16, or ASCII text with every other byte zero."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    sample = data[:64]
    return len(sample) >= 8 and (not any(sample[1::2]) or not any(sample[0::2])) and any(sample)


def _directory_message(what: str) -> str:
    return (
        f"the upload is {what} of a directory-format dump (pg_dump -Fd), which pg_restore cannot "
        f"read as one file; make a single-file dump instead, e.g. {SINGLE_FILE}, and upload that"
    )


def _tar_of_directory(data: bytes) -> bool:
    """Whether the tar members in `data` (a head: as many headers as it holds) are the
    files of a directory-format dump."""
    at = 0
    while at + _TAR_BLOCK <= len(data) and data[at + 257 : at + 262] == b"ustar":
        name = data[at : at + 100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if _DIRECTORY_MEMBER.search(name):
            return True
        try:
            size = int(data[at + 124 : at + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return False
        at += _TAR_BLOCK + (size + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK
    return False


def _zip_of_directory(data: bytes) -> bool:
    """Whether a local file header in `data` names a file of a directory-format dump."""
    at = data.find(b"PK\x03\x04")
    while 0 <= at and at + 30 <= len(data):
        length = int.from_bytes(data[at + 26 : at + 28], "little")
        name = data[at + 30 : at + 30 + length].decode("utf-8", "replace")
        if _DIRECTORY_MEMBER.search(name):
            return True
        at = data.find(b"PK\x03\x04", at + 30)
    return False


def _search(pattern: re.Pattern[str], text: str) -> str | None:
    found = pattern.search(text)
    return found.group(1) if found else None


def _hex(data: bytes) -> str:
    return " ".join(f"0x{b:02x}" for b in data[:8])


class _Truncated(Exception):
    """The header runs past the bytes available."""


class _Damaged(Exception):
    """The header holds values pg_restore would reject."""


def _read_header(buf: bytes, start: int) -> tuple[tuple[int, int, int], int, str | None, str | None]:
    """(version, format code, dumped_from, dumped_by) from the header at `start`."""
    pos = start + len(_MAGIC)

    def byte() -> int:
        nonlocal pos
        if pos >= len(buf):
            raise _Truncated
        pos += 1
        return buf[pos - 1]

    def integer() -> int:
        # ReadInt: a sign byte, then int_size bytes, least significant first.
        negative = byte() != 0
        value = sum(byte() << (8 * i) for i in range(int_size))
        return -value if negative else value

    def string() -> str | None:
        nonlocal pos
        length = integer()
        if length < 0:
            return None
        if length > 1024:
            raise _Damaged(f"a {length}-byte name in the header")
        if pos + length > len(buf):
            raise _Truncated
        pos += length
        return buf[pos - length : pos].decode("utf-8", "replace")

    vmaj, vmin = byte(), byte()
    version = (vmaj, vmin, byte() if (vmaj, vmin) > (1, 0) else 0)
    int_size = byte()
    if vmaj != 1:
        raise _Damaged(f"archive version {vmaj}.{vmin}")
    if not 1 <= int_size <= 32:
        raise _Damaged(f"integer size {int_size}")
    if version >= (1, 7, 0):
        byte()  # offSize
    fmt = byte()
    if version >= (1, 15, 0):
        byte()  # compression algorithm
    elif version >= (1, 4, 0):
        integer()  # compression level
    elif version >= (1, 2, 0):
        byte()  # compression level
    dumped_from = dumped_by = None
    if version >= (1, 4, 0):
        for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
            integer()
        string()  # database name
    if version >= (1, 10, 0):
        dumped_from = string()
        dumped_by = string()
    return version, fmt, dumped_from, dumped_by
