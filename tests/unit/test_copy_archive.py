"""An archive's rows as the copy engine reads them (stages.copy.archive): the COPY
statements it accepts, pg_restore's output split into each table's rows, batches."""

from __future__ import annotations

import io
import threading

import pytest

from stages.copy import archive
from stages.copy.archive import ArchiveDataDamaged, CopyStatement, StreamedTable, parse_copy
from stages.copy.stream import Flow, SourceTable
from stages.dumps.toc import TocEntry
from stages.errors import PermanentError


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (b"COPY public.a (id, t) FROM stdin;\n", CopyStatement("public", "a", ("id", "t"))),
        (b'COPY public."B c" (id, "n, m") FROM stdin;\n', CopyStatement("public", "B c", ("id", "n, m"))),
        (b'COPY "we""ird".t ("a""b") FROM stdin;\n', CopyStatement('we"ird', "t", ('a"b',))),
        (b"COPY public.nocolumns  FROM stdin;\n", CopyStatement("public", "nocolumns", ())),
    ],
)
def test_a_copy_statement_as_pg_dump_writes_it_is_parsed(statement, expected):
    assert parse_copy(statement) == expected


def test_names_are_decoded_from_the_archive_encoding():
    assert parse_copy(b'COPY public."caf\xe9" ("cr\xe8me") FROM stdin;\n', "latin-1") == CopyStatement(
        "public", "café", ("crème",)
    )
    assert parse_copy(b'COPY public."caf\xe9" (id) FROM stdin;\n', "utf-8") is None


@pytest.mark.parametrize(
    "statement",
    [
        b"COPY public.a (id) FROM stdin; DROP TABLE public.b;\n",
        b"COPY public.a (id) FROM stdin;\nDROP TABLE public.b;\n",
        b"COPY public.a (id) FROM PROGRAM 'id';\n",
        b"COPY public.a (id) FROM '/etc/passwd';\n",
        b"COPY public.a (id) TO stdout;\n",
        b"COPY a (id) FROM stdin;\n",
        b"COPY public.a (id) FROM stdin WITH (FORMAT binary);\n",
        b"COPY public.a (id) FROM stdin;",
        b"COPY public.A (id) FROM stdin;\n",
        b"",
    ],
)
def test_anything_else_is_not_streamed(statement):
    assert parse_copy(statement) is None


def _streamed(name: str, statement: bytes, size: int = 10, oid: int = 1) -> StreamedTable:
    parsed = parse_copy(statement)
    assert parsed is not None
    table = SourceTable(f"public.{name}", "public", name, parsed.columns, size, oid)
    return StreamedTable(
        table,
        TocEntry(f"{oid}; 0 {oid} TABLE DATA public {name} x", oid, "TABLE DATA", "public", name),
        statement,
        parsed,
    )


class _Stdout(io.BytesIO):
    """pg_restore's stdout, handing out at most `chunk` bytes a read."""

    def __init__(self, data: bytes, chunk: int) -> None:
        super().__init__(data)
        self.chunk = chunk

    def read1(self, size: int = -1) -> bytes:
        return super().read(min(self.chunk, size if size > 0 else self.chunk))


HEADER = b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\nSET client_encoding = 'UTF8';\n\n"


def _section(statement: bytes, rows: bytes) -> bytes:
    return (
        b"--\n-- Data for Name: x; Type: TABLE DATA; Schema: public; Owner: -\n--\n\n"
        + statement
        + rows
        + b"\\.\n\n\n"
    )


def _read_all(stdout: bytes, statements: list[bytes], chunk: int) -> list[tuple[bytes, int]]:
    rows = archive._Rows(_Stdout(stdout, chunk), threading.Event())
    out = []
    for statement in statements:
        rows.skip_to(statement, "t")
        block = rows.block(Flow())
        data = b""
        while piece := block.read(7):
            data += piece
        out.append((data, block.count))
    rows.drain()
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 17])
def test_each_tables_rows_end_at_its_end_marker_however_the_output_is_cut(chunk):
    a = b"COPY public.a (id, t) FROM stdin;\n"
    b = b"COPY public.b (id) FROM stdin;\n"
    empty = b"COPY public.e (id) FROM stdin;\n"
    tricky = (
        b"1\t\\\\.\n"  # a value that is a backslash and a dot
        b"2\tCOPY public.b (id) FROM stdin;\n"  # a value that looks like the next statement
        b"3\t\\\\.\\n\n"
        b"4\t\\.x\n"
    )
    stdout = (
        HEADER + _section(a, tricky) + _section(empty, b"") + _section(b, b"7\n8\n") + b"\\unrestrict abc\n"
    )
    got = _read_all(stdout, [a, empty, b], chunk)
    assert got == [(tricky, 4), (b"", 0), (b"7\n8\n", 2)]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_a_statement_whose_names_hold_newlines_is_found_across_its_lines(chunk):
    """A quoted name may hold a newline: pg_restore prints the statement as the TOC has it."""
    a = b'COPY public."two\nlines" (id, "a\nb") FROM stdin;\n'
    b = b"COPY public.b (id) FROM stdin;\n"
    stdout = HEADER + _section(a, b"1\tx\n") + _section(b, b"7\n") + b"\\unrestrict abc\n"
    assert _read_all(stdout, [a, b], chunk) == [(b"1\tx\n", 1), (b"7\n", 1)]


def test_output_that_ends_inside_a_tables_rows_is_refused():
    a = b"COPY public.a (id) FROM stdin;\n"
    with pytest.raises(ArchiveDataDamaged, match="ends inside a table's rows"):
        _read_all(HEADER + a + b"1\n2\n", [a], 4)


def test_a_table_whose_rows_are_missing_is_refused():
    a = b"COPY public.a (id) FROM stdin;\n"
    other = b"COPY public.z (id) FROM stdin;\n"
    with pytest.raises(ArchiveDataDamaged, match="no rows for table t"):
        _read_all(HEADER + _section(other, b"1\n"), [a], 64)


def test_a_stopped_copy_stops_reading():
    stopped = threading.Event()
    stopped.set()
    rows = archive._Rows(_Stdout(HEADER, 64), stopped)
    with pytest.raises(PermanentError, match="stopped"):
        rows.skip_to(b"COPY public.a (id) FROM stdin;\n", "public.a")


def test_a_block_counts_rows_and_bytes_into_its_flow():
    a = b"COPY public.a (id) FROM stdin;\n"
    rows = archive._Rows(_Stdout(HEADER + _section(a, b"1\n2\n3\n"), 2), threading.Event())
    rows.skip_to(a, "public.a")
    flow = Flow()
    block = rows.block(flow)
    while block.read():
        pass
    assert (block.count, flow.rows, flow.bytes, block.done) == (3, 3, 6, True)


def test_large_tables_load_alone_and_small_ones_together():
    big = [
        _streamed(f"big{i}", f"COPY public.big{i} (id) FROM stdin;\n".encode(), archive.BATCH_BYTES, i)
        for i in range(2)
    ]
    small = [
        _streamed(f"s{i}", f"COPY public.s{i} (id) FROM stdin;\n".encode(), 1000, 10 + i) for i in range(450)
    ]
    batches = archive._batches([big[0], *small[:300], big[1], *small[300:]], seekable=True, lanes=2)
    sizes = [len(b) for b in batches]
    assert sorted(sizes) == [1, 1, 50, 200, 200]
    assert [s for batch in batches for s in batch if s in big] == big


def test_without_offsets_the_tables_are_cut_into_a_few_runs_in_the_archives_order():
    tables = [
        _streamed(f"t{i}", f"COPY public.t{i} (id) FROM stdin;\n".encode(), 1000 * (i + 1), i)
        for i in range(40)
    ]
    batches = archive._batches(tables, seekable=False, lanes=2)
    assert 1 < len(batches) <= 4
    assert [s for batch in batches for s in batch] == tables


def test_what_follows_is_read_only_up_to_a_limit():
    rows = archive._Rows(_Stdout(b"x" * 1000, 100), threading.Event())
    assert rows.drain(300) is False
    rows = archive._Rows(_Stdout(b"x" * 1000, 100), threading.Event())
    assert rows.drain(5000) is True
    assert rows.drain() is True
