"""The copy's memory path, attacked (stages.copy.stream._through_memory): a small table
whose rows outgrow MEMORY_LIMIT_BYTES falls back to the pipe on the same source session.
What the source says in the rest of the abandoned COPY must not be lost."""

from __future__ import annotations

import pytest

import stages.copy.stream as stream
from tests.support import pg
from tests.support.copying import CopyRun, source_url

PACKED = """
CREATE TABLE public.packed (id int PRIMARY KEY, body text);
INSERT INTO public.packed SELECT g, repeat('abc', 400000) FROM generate_series(1, 60) g;
"""


def test_a_source_error_after_the_memory_read_was_outgrown_is_the_news(scratch_db, tmp_path, monkeypatch):
    """The source cancels the COPY (a recovery conflict on a standby, an operator's
    pg_cancel_backend) after the read outgrew memory: libpq dropped the rest of the
    abandoned COPY, its error with it, and the pipe's COPY then failed with "current
    transaction is aborted", which says nothing of the cause (nor is retried as a
    cancelled read is)."""
    source, target = scratch_db("capysrc_outcancel"), scratch_db("capytgt_outcancel")
    pg.psql(source, text=PACKED)
    monkeypatch.setattr(stream, "MEMORY_LIMIT_BYTES", 2 << 20)
    original = stream._through_memory
    pids: list[int] = []
    fired: list[int] = []

    def through_memory(table, source_conn, target_conn, flow):
        pids.append(source_conn.info.backend_pid)
        return original(table, source_conn, target_conn, flow)

    class Cancelling(stream._Held):
        def write(self, data):
            if not fired and self.size + len(data) > self.limit:
                # The read outgrows memory; the source's COPY is still sending (blocked on
                # the socket): it is cancelled there, and says so after the rows it had sent.
                fired.append(pids[-1])
                pg.admin("SELECT pg_cancel_backend(%s)", (pids[-1],))
            return super().write(data)

    monkeypatch.setattr(stream, "_through_memory", through_memory)
    monkeypatch.setattr(stream, "_Held", Cancelling)
    monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 1 << 40)
    with pytest.raises(Exception) as caught:
        CopyRun(source_url(source), target, tmp_path, lanes=1).run()
    assert fired  # packed outgrew memory
    text = f"{type(caught.value).__name__}: {caught.value}"
    assert "current transaction is aborted" not in text, text
    assert "canceling statement" in text, text


def test_an_outgrown_table_is_exact_and_the_lane_goes_on(scratch_db, tmp_path, monkeypatch):
    """Values with newlines, backslashes, \\. lines, NULLs, bytea and a huge single value;
    the outgrown table first, more tables after it on the same lane."""
    source, target = scratch_db("capysrc_outexact"), scratch_db("capytgt_outexact")
    pg.psql(
        source,
        text=PACKED
        + "CREATE TABLE public.odd (id int PRIMARY KEY, t text, b bytea);\n"
        + "INSERT INTO public.odd VALUES (1, E'a\\nb\\\\c\\r\\t', '\\x00ff'), (2, E'\\\\.', NULL), (3, NULL, ''), "
        + "(4, E'\\n\\\\.\\n', '\\x5c2e0a');\n"
        + "INSERT INTO public.odd SELECT 10 + g, repeat(E'x\\n', 500000), decode(repeat('5c0a', 100000), 'hex') FROM generate_series(1, 8) g;\n"
        + "CREATE TABLE public.after (id int PRIMARY KEY);\n"
        + "INSERT INTO public.after SELECT generate_series(1, 1000);\n",
    )
    monkeypatch.setattr(stream, "MEMORY_LIMIT_BYTES", 1 << 20)
    monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 1 << 40)
    result = CopyRun(source_url(source), target, tmp_path, lanes=1).run()
    assert result.source_counts == result.target_counts == pg.row_counts(target) == pg.row_counts(source)
    for query in (
        "SELECT md5(string_agg(body, '' ORDER BY id)) FROM public.packed",
        "SELECT md5(string_agg(coalesce(t, '<null>') || coalesce(encode(b, 'hex'), '<null>'), '|' ORDER BY id)) FROM public.odd",
    ):
        assert pg.admin(query, dbname=target) == pg.admin(query, dbname=source)
