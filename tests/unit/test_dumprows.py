import io

from stages.dumps.rows import RowCounter, count_stream, table_key


def test_table_keys_unquote_identifiers():
    assert table_key(b"public.actor") == "public.actor"
    assert table_key(b'"My Schema"."Mixed ""Case"""') == 'My Schema.Mixed "Case"'
    assert table_key('public."bıgınt_table"'.encode()) == "public.bıgınt_table"


def test_counts_copy_blocks_and_flags_insert_tables():
    dump = (
        b"COPY public.a (id) FROM stdin;\n1\n2\n\\N\n\\.\n"
        b'COPY "S"."b" (x, y) FROM stdin;\n\\.\n'
        b"INSERT INTO public.c VALUES (1);\nINSERT INTO public.c VALUES (2);\n"
        b"COPY public.d (t) FROM stdin;\n" + b"y" * 5000 + b"\nz\n\\.\n"
    )
    counter = RowCounter()
    count_stream(io.BytesIO(dump), counter, piece_bytes=1024)
    counts, uncounted = counter.result()
    assert counts == {"public.a": 3, "S.b": 0, "public.d": 2}
    assert uncounted == ["public.c"]


def test_sequences_and_statement_kinds():
    dump = (
        b"CREATE TABLE public.a (id int);\n"
        b"CREATE UNIQUE INDEX a_i ON public.a (id);\n"
        b"SELECT pg_catalog.setval('public.a_id_seq', 42, true);\n"
        b"SELECT pg_catalog.setval('public.\"Odd''Seq\"', 1, false);\n"
    )
    counter = RowCounter()
    count_stream(io.BytesIO(dump), counter)
    assert counter.sequences == {"public.a_id_seq": 42, "public.Odd'Seq": None}
    assert counter.kinds == {"tables": 1, "indexes": 1}


def test_copy_rows_of_any_length_are_counted_in_any_chunking():
    rows = [b"x" * n for n in (0, 1, 70000, 200000, 5, 65535, 65536, 131072, 3)]
    dump = b"COPY public.t (a) FROM stdin;\n" + b"".join(r + b"\n" for r in rows) + b"\\.\nSELECT 1;\n"
    for size in (7, 1000, 65536, 100000, 1 << 20):
        counter = RowCounter()
        count_stream(io.BytesIO(dump), counter, piece_bytes=size)
        assert counter.result() == ({"public.t": len(rows)}, [])


def test_lines_inside_strings_and_bodies_are_not_counted_as_statements():
    dump = (
        b"CREATE FUNCTION public.f() RETURNS void LANGUAGE plpgsql AS $$\nbegin\n"
        b"CREATE TABLE public.x (id int);\nCOPY public.x (id) FROM stdin;\nend $$;\n"
        b"INSERT INTO public.t VALUES ('\nCOPY public.y (id) FROM stdin;\n1\n');\n"
    )
    counter = RowCounter()
    count_stream(io.BytesIO(dump), counter)
    assert counter.kinds == {"functions": 1}
    assert counter.result() == ({}, ["public.t"])
