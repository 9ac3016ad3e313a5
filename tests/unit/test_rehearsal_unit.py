"""The rehearsal's verdicts from errors and dependencies, and how a plain script is cut
into objects (no sockets: the integration tests run real restores)."""

from __future__ import annotations

from stages.dumps.toc import parse
from stages.preflight.plainrehearsal import split_plain
from stages.preflight.rehearsal import PREAMBLE, Node, judge, skip_map, split_script


def nodes(listing: str, deps: dict[int, tuple[int, ...]]) -> list[Node]:
    return [Node(entry, deps.get(entry.dump_id, ())) for entry in parse(listing)]


LISTING = """\
10; 1255 1 FUNCTION public capy_in(cstring) postgres
11; 1247 2 TYPE public capy_cube postgres
12; 1259 3 TABLE public shapes postgres
13; 2605 4 CAST - CAST (text AS public.capy_cube) postgres
14; 3256 5 POLICY public notes notes_read postgres
15; 0 0 COMMENT public POLICY notes_read ON notes postgres
16; 1255 6 FUNCTION public odd() postgres
17; 2328 7 FOREIGN DATA WRAPPER - capy_fdw postgres
18; 1417 8 SERVER - capy_srv postgres
"""
DEPS = {11: (10,), 12: (11,), 13: (11,), 15: (14,), 18: (17,)}


def test_what_a_table_needs_is_refused_and_the_rest_skipped_with_its_dependents():
    errors = {
        10: "permission denied for language c",
        14: 'role "authenticated" does not exist',
        15: 'policy "notes_read" for table "notes" does not exist',
    }
    result = judge(nodes(LISTING, DEPS), errors)
    assert result.refused == [
        "FUNCTION public.capy_in(cstring): permission denied for language c; needed by TABLE public.shapes. "
        "A managed database cannot hold it as the project's role: change those to not use it (another type "
        "or function), or drop it from the source, and import again"
    ]
    assert result.skipped == [
        {
            "object": "POLICY public.notes notes_read",
            "reason": 'a managed database cannot hold it as the project\'s role (role "authenticated" does not exist)',
            "key": ["POLICY", "public", "notes notes_read"],
        },
        {
            "object": "COMMENT public.POLICY notes_read ON notes",
            "reason": 'it depends on POLICY public.notes notes_read, which is skipped (role "authenticated" does not exist)',
            "key": ["COMMENT", "public", "POLICY notes_read ON notes"],
        },
    ]
    assert skip_map(result.skipped)[("POLICY", "public", "notes notes_read")].startswith("a managed database")


def test_an_error_of_another_kind_is_refused_as_it_is():
    result = judge(nodes(LISTING, DEPS), {16: 'relation "nowhere" does not exist', PREAMBLE: "boom"})
    assert result.skipped == []
    assert result.refused == [
        'FUNCTION public.odd(): relation "nowhere" does not exist',
        "the statements before the first object: boom",
    ]


def test_what_depends_on_an_entry_the_plan_leaves_out_is_skipped_with_it():
    result = judge(
        nodes(LISTING, DEPS),
        {18: 'foreign-data wrapper "capy_fdw" does not exist'},
        {17: "foreign data wrappers need superuser"},
    )
    assert result.refused == []
    assert result.skipped == [
        {
            "object": "SERVER capy_srv",
            "reason": "it depends on FOREIGN DATA WRAPPER capy_fdw, which is skipped (foreign data wrappers need superuser)",
            "key": ["SERVER", "-", "capy_srv"],
        }
    ]


def test_a_rendered_schema_splits_at_its_toc_entries():
    script = (
        "\\restrict abc123\nSET x = 1;\n\n"
        "--\n-- TOC entry 215 (class 1259 OID 16386)\n-- Name: t; Type: TABLE; Schema: public; Owner: -\n--\n\n"
        "CREATE TABLE public.t (id int);\n\n"
        "--\n-- TOC entry 3 (class 2606 OID 16390)\n-- Dependencies: 215\n--\n\nALTER TABLE public.t ADD PRIMARY KEY (id);\n"
        "\\unrestrict abc123\n"
    )
    preamble, blocks = split_script(script)
    assert "restrict" not in preamble and "SET x = 1;" in preamble
    assert list(blocks) == [215, 3]
    assert "CREATE TABLE public.t" in blocks[215] and "ADD PRIMARY KEY" in blocks[3]


PLAIN = """SET client_encoding = 'UTF8';

--
-- Name: notes; Type: TABLE; Schema: public; Owner: app; Tablespace: fast
--

CREATE TABLE public.notes (id int);

--
-- Data for Name: notes; Type: TABLE DATA; Schema: public; Owner: app
--

COPY public.notes (id) FROM stdin;
1
\\.

--
-- Name: notes_read; Type: POLICY; Schema: public; Owner: app
--

CREATE POLICY notes_read ON public.notes TO authenticated USING (true);

--
-- Name: notes_seq; Type: SEQUENCE SET; Schema: public; Owner: app
--

SELECT pg_catalog.setval('public.notes_seq', 1, false);

--
-- Name: last; Type: VIEW; Schema: public; Owner: app
--

CREATE VIEW public.la"""


def test_a_plain_script_splits_at_pg_dumps_headers_without_its_data():
    preamble, objects = split_plain(PLAIN, complete=False)
    assert preamble.strip() == "SET client_encoding = 'UTF8';"
    # The data, the sequence value and the object cut short at the end are left out.
    assert [(entry.desc, entry.namespace, entry.name) for entry, _ in objects] == [
        ("TABLE", "public", "notes"),
        ("POLICY", "public", "notes_read"),
    ]
    assert "CREATE POLICY notes_read" in objects[1][1] and "COPY" not in "".join(body for _, body in objects)
    _, whole = split_plain(PLAIN, complete=True)
    assert [entry.desc for entry, _ in whole] == ["TABLE", "POLICY", "VIEW"]


def test_a_header_wherever_the_scanner_cuts_the_script_still_splits_it():
    """The scanner reads the script a step (64 kB) at a time and hands a run of space
    on in pieces: every header splits its entry off, wherever a step ends (a header
    astride two steps once merged two foreign keys into one entry, run together), and
    a character astride two steps is not broken."""
    from stages.dumps.sqlscript import STEP

    def entry(n: int) -> str:
        return (
            f"--\n-- TOC entry {n} (class 2606 OID {n})\n-- Name: t{n}; Type: TABLE; Schema: public; Owner: -\n--\n\n"
            f"CREATE TABLE public.t{n} (é integer);\n\n\n"
        )

    for shift in range(0, 120, 7):
        script = "SET client_encoding = 'UTF8';\n" + "-- " + "x" * (STEP - 40 - shift) + "\n\n\n"
        script += "".join(entry(n) for n in range(1, 6))
        preamble, blocks = split_script(script)
        assert sorted(blocks) == [1, 2, 3, 4, 5], shift
        for n, block in blocks.items():
            assert f"CREATE TABLE public.t{n} (é integer);" in block and block.count("CREATE") == 1, (
                shift,
                n,
            )


def test_a_begin_atomic_body_keeps_its_semicolons_in_one_entry():
    def entry(n: int, sql: str) -> str:
        return f"--\n-- TOC entry {n} (class 1255 OID {n})\n-- Name: f{n}; Type: FUNCTION; Schema: public; Owner: -\n--\n\n{sql}\n\n\n"

    body = (
        "CREATE FUNCTION public.f1() RETURNS integer\n    LANGUAGE sql\n    BEGIN ATOMIC\n SELECT 1;\n"
        ' SELECT CASE WHEN true THEN 2 ELSE 3 END AS "case";\nEND;'
    )
    script = (
        "SET client_encoding = 'UTF8';\n\n"
        + entry(1, body)
        + entry(2, "CREATE TABLE public.t (\n    id integer\n);")
    )
    _, blocks = split_script(script)
    assert sorted(blocks) == [1, 2]
    assert body in blocks[1] and "CREATE TABLE" not in blocks[1]
