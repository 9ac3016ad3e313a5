"""detect_format on dumps built from bytes: a captured pg_dump 15 header, headers
written the way pg_dump's WriteHead writes them, and look-alikes that must be refused.
Real pg_dump output is covered by tests/integration/test_dumpformat_real.py."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from stages.dumps.formats import HEAD_BYTES, DumpInfo, detect_format
from stages.errors import PermanentError, UnrecognizedDump

# The first 138 bytes of `pg_dump -Fc` 15.20 (Debian) of a database "capy_probe".
PG15_CUSTOM_HEAD = bytes.fromhex(
    "5047444d50010e000408010101000000002f0000000027000000000700000000"
    "1c000000000a000000007e0000000000000000000a000000636170795f70726f"
    "6265001e00000031352e3230202844656269616e2031352e32302d302b646562"
    "3132753129001e00000031352e3230202844656269616e2031352e32302d302b"
    "64656231327531290007"
)
PG15 = "15.20 (Debian 15.20-0+deb12u1)"

PLAIN_HEAD = f"""--
-- PostgreSQL database dump
--

\\restrict kXMRHRUjchbU0pkcnRkMmeYHSN3gqZk3JttNtKesgubYv7UaDiKz7fMqCbqaRAg

-- Dumped from database version {PG15}
-- Dumped by pg_dump version 16.4

SET statement_timeout = 0;
SET lock_timeout = 0;
SET client_encoding = 'UTF8';
""".encode()


def write_int(value: int, int_size: int = 4) -> bytes:
    """pg_dump's WriteInt: a sign byte, then the magnitude least significant first."""
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(int_size, "little")


def write_str(value: str | None) -> bytes:
    if value is None:
        return write_int(-1)
    raw = value.encode()
    return write_int(len(raw)) + raw


def archive_header(
    version: tuple[int, int, int] = (1, 16, 0),
    fmt: int = 1,
    dumped_from: str | None = "17.2",
    dumped_by: str | None = "17.2",
) -> bytes:
    """An archive header laid out as WriteHead (pg_backup_archiver.c) writes it."""
    out = b"PGDMP" + bytes(version) + bytes([4, 8, fmt])
    out += bytes([1]) if version >= (1, 15, 0) else write_int(-1)
    out += b"".join(write_int(n) for n in (5, 4, 3, 2, 1, 124, 0)) + write_str("app")
    if version >= (1, 10, 0):
        out += write_str(dumped_from) + write_str(dumped_by)
    return out + b"\x00" * 64  # the TOC follows; its content does not matter here


def tar_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def dump(tmp_path: Path):
    def write(data: bytes) -> Path:
        path = tmp_path / "upload"
        path.write_bytes(data)
        return path

    return write


def test_real_pg15_custom_header(dump) -> None:
    assert detect_format(dump(PG15_CUSTOM_HEAD + b"\x00" * 100)) == DumpInfo("custom", "1.14.0", PG15, PG15)


@pytest.mark.parametrize(
    ("version", "expected"),
    [((1, 16, 0), "1.16.0"), ((1, 15, 0), "1.15.0"), ((1, 12, 0), "1.12.0")],
)
def test_custom_headers_of_other_versions(dump, version, expected) -> None:
    # 1.15 (PostgreSQL 16) replaced the compression level int by an algorithm byte.
    info = detect_format(dump(archive_header(version, dumped_from="9.6.24", dumped_by="17.2")))
    assert info == DumpInfo("custom", expected, "17.2", "9.6.24")


def test_archive_before_1_10_has_no_version_strings(dump) -> None:
    assert detect_format(dump(archive_header((1, 9, 0)))) == DumpInfo("custom", "1.9.0")


def test_tar_archive(dump) -> None:
    data = tar_with({"toc.dat": archive_header((1, 15, 0), fmt=3), "3340.dat": b"1\tx\n\\.\n"})
    assert detect_format(dump(data)) == DumpInfo("tar", "1.15.0", "17.2", "17.2")


def test_plain_sql(dump) -> None:
    assert detect_format(dump(PLAIN_HEAD + b"CREATE TABLE t ();\n" * 1000)) == DumpInfo(
        "plain", None, "16.4", PG15
    )


def test_gzip_plain(dump) -> None:
    info = detect_format(dump(gzip.compress(PLAIN_HEAD + b"COPY t FROM stdin;\n" * 5000)))
    assert info == DumpInfo("gzip-plain", None, "16.4", PG15)


def test_pg_dumpall_output_is_refused_naming_pg_dump(dump) -> None:
    data = b"--\n-- PostgreSQL database cluster dump\n--\n\nSET default_transaction_read_only = off;\n"
    with pytest.raises(UnrecognizedDump, match="pg_dumpall output .* dump the one database with pg_dump"):
        detect_format(dump(data))


@pytest.mark.parametrize(
    "start", [b"SET search_path = public;\n", b"\xef\xbb\xbf\n\nCREATE TABLE a ();\n", b"\\connect app\n"]
)
def test_plain_scripts_starting_without_comments(dump, start) -> None:
    assert detect_format(dump(start)).format == "plain"


def test_multibyte_character_cut_by_the_head_is_still_plain(dump) -> None:
    filler = b"-- " + b"x" * (HEAD_BYTES - 5) + b"\n"
    assert len(filler) == HEAD_BYTES - 1
    assert detect_format(dump(filler + "é".encode() * 10)).format == "plain"


def test_latin1_dump_that_declares_its_encoding(dump) -> None:
    data = PLAIN_HEAD.replace(b"'UTF8'", b"'LATIN1'") + "INSERT INTO t VALUES ('café');\n".encode("latin-1")
    assert detect_format(dump(data)).format == "plain"


def test_only_the_head_is_read(dump) -> None:
    # Binary junk after the first chunk is pg_restore's business, not detection's.
    assert detect_format(dump(PLAIN_HEAD.ljust(HEAD_BYTES, b"-") + os.urandom(4096))).format == "plain"


def test_dump_info_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DumpInfo("plain").format = "custom"  # type: ignore[misc]


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dump.sql", PLAIN_HEAD)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "the upload is empty"),
        (
            zip_bytes(),
            "the upload is a zip archive, not a pg_dump output; upload a file made by pg_dump -Fc, -Ft or plain SQL",
        ),
        (bytes(range(7, 200)), "starts with bytes 0x07 0x08 0x09"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "starts with bytes 0x89 0x50 0x4e 0x47"),
        (bytes([0xFF, 0xFE, 0x41]) * 10, "UTF-16 text, as Windows PowerShell writes"),
        ("\ufeff--\n-- PostgreSQL database dump\n".encode("utf-16-le"), "pg_dump -Fc -f dump.dump DBNAME"),
        ("--\n-- PostgreSQL database dump\n".encode("utf-16-be"), "UTF-16 text"),
        (gzip.compress("--\n-- PostgreSQL database dump\n".encode("utf-16")), "UTF-16 text"),
        (gzip.compress(bytes(range(256)) * 8), "is gzip-compressed, but inside it starts with bytes"),
        (gzip.compress(PG15_CUSTOM_HEAD), "gzip-compressed pg_dump archive"),
        (gzip.compress(tar_with({"toc.dat": archive_header(fmt=3)})), "gzip-compressed tar archive"),
        (b"\x1f\x8b\x08\x00garbage" * 4, "gzip-compressed but its data is damaged"),
        (gzip.compress(b""), "gzip-compressed but empty inside"),
        (bz2.compress(PLAIN_HEAD), "the upload is bzip2-compressed; decompress it"),
        (lzma.compress(PLAIN_HEAD), "the upload is xz-compressed"),
        (archive_header(fmt=3), "toc.dat of a directory-format (-Fd) dump"),
        (archive_header(fmt=5), "format code 5"),
        (
            tar_with({"dump/toc.dat": archive_header(fmt=3)}),
            "a tar archive of a directory-format dump (pg_dump -Fd), which pg_restore cannot read as one file; "
            "make a single-file dump instead, e.g. pg_dump -Fc -f dump.dump DBNAME",
        ),
        (
            tar_with({"dump/3456.dat.gz": b"x" * 600, "dump/toc.dat": b""}),
            "directory-format dump (pg_dump -Fd)",
        ),
        (
            gzip.compress(tar_with({"d/toc.dat": b""})),
            "gzip-compressed tar archive of a directory-format dump",
        ),
        (zip_of({"dump/toc.dat": b"", "dump/3456.dat.gz": b""}), "a zip archive of a directory-format dump"),
        (tar_with({"backup/data.csv": b"x"}), "its first member is 'backup/data.csv', not toc.dat"),
        (tar_with({"toc.dat": b"hello"}), "not one made by pg_dump -Ft"),
        (tar_with({"toc.dat": archive_header(fmt=1)}), "format code 1"),
        (PG15_CUSTOM_HEAD[:40], "ends inside its header; it looks truncated"),
        (b"PGDMP\x09\x01\x00" + b"\x00" * 200, "header is damaged (archive version 9.1)"),
        (
            b"hello, world\nthis is not SQL\n",
            "is text but does not look like a pg_dump SQL script (it starts with 'hello, world')",
        ),
    ],
    ids=lambda v: v[:30] if isinstance(v, str) else None,
)
def test_refused_with_a_message_naming_what_was_found(dump, data: bytes, fragment: str) -> None:
    with pytest.raises(UnrecognizedDump) as caught:
        detect_format(dump(data))
    assert fragment in caught.value.message
    assert isinstance(caught.value, PermanentError)
