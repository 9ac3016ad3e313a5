"""The post-data section cut into blocks (stages.copy.postdata.split), and a primary key's
or unique constraint's block rewritten to attach an index built beforehand
(stages.copy.engine._constraint_sql)."""

from __future__ import annotations

from stages.copy.catalog import Owned
from stages.copy.engine import _constraint_sql
from stages.copy.postdata import Block, first_statement, split
from stages.copy.stream import SourceTable
from stages.dumps.toc import TocEntry

# pg_restore 15.20 --no-owner --section=post-data of a table "We""ird t" (as rendered).
RENDERED = """--
-- PostgreSQL database dump
--

\\restrict tfTZJJhwTE9TPearPtEMwpHpv6EAeKdWRn8R52TBvF2zUV5xS9fd6dk8Mi7RmQj

-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);

SET default_tablespace = '';

--
-- Name: We"ird t p k"x; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public."We""ird t"
    ADD CONSTRAINT "p k""x" PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED;

ALTER TABLE public."We""ird t" CLUSTER ON "p k""x";


--
-- Name: We"ird t u; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public."We""ird t"
    ADD CONSTRAINT u UNIQUE ("Co l");


--
-- Name: CONSTRAINT u ON "We""ird t"; Type: COMMENT; Schema: public; Owner: -
--

COMMENT ON CONSTRAINT u ON public."We""ird t" IS 'c';


--
-- Name: ix; Type: INDEX; Schema: my schema; Owner: -
--

CREATE INDEX ix ON "my schema"."We""ird t" USING btree ("Co l");


--
-- PostgreSQL database dump complete
--

\\unrestrict tfTZJJhwTE9TPearPtEMwpHpv6EAeKdWRn8R52TBvF2zUV5xS9fd6dk8Mi7RmQj

"""

TABLE = TocEntry('214; 1259 157329 TABLE public We"ird t postgres', 214, "TABLE", "public", 'We"ird t')
PKEY = TocEntry(
    '3198; 2606 157333 CONSTRAINT public We"ird t p k"x postgres',
    3198,
    "CONSTRAINT",
    "public",
    'We"ird t p k"x',
)
UNIQUE = TocEntry(
    '3200; 2606 157336 CONSTRAINT public We"ird t u postgres', 3200, "CONSTRAINT", "public", 'We"ird t u'
)
COMMENT = TocEntry(
    '3350; 0 0 COMMENT public CONSTRAINT u ON "We""ird t" postgres',
    3350,
    "COMMENT",
    "public",
    'CONSTRAINT u ON "We""ird t"',
)
# As stages.dumps.toc.parse splits a listing line whose schema's name holds a space.
INDEX = TocEntry("3196; 1259 157342 INDEX my schema ix postgres", 3196, "INDEX", "my", "schema ix")


def test_split_gives_one_block_per_entry_in_order_passing_over_other_sections():
    rendered = split(RENDERED, [TABLE, PKEY, UNIQUE, COMMENT, INDEX])
    assert rendered.exact
    assert [block.entry for block in rendered.blocks] == [PKEY, UNIQUE, COMMENT, INDEX]
    assert rendered.blocks[0].sql.strip() == (
        'ALTER TABLE ONLY public."We""ird t"\n'
        '    ADD CONSTRAINT "p k""x" PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED;\n\n'
        'ALTER TABLE public."We""ird t" CLUSTER ON "p k""x";'
    )
    assert rendered.blocks[2].sql.strip() == 'COMMENT ON CONSTRAINT u ON public."We""ird t" IS \'c\';'
    # The last block runs to the end: pg_restore's closing comment is in it, its \\unrestrict is not.
    last = rendered.blocks[3].sql.strip().splitlines()
    assert last[0] == 'CREATE INDEX ix ON "my schema"."We""ird t" USING btree ("Co l");'
    assert all(line.startswith("--") for line in last[1:] if line.strip())


def test_the_preamble_is_the_session_settings_without_psqls_restrict_lines():
    rendered = split(RENDERED, [PKEY, UNIQUE, COMMENT, INDEX])
    assert "SET client_encoding = 'UTF8';" in rendered.preamble
    assert "SELECT pg_catalog.set_config('search_path', '', false);" in rendered.preamble
    assert "\\restrict" not in rendered.preamble
    assert all("\\restrict" not in b.sql and "\\unrestrict" not in b.sql for b in rendered.blocks)


def test_a_block_that_matches_no_entry_makes_the_rendering_inexact():
    rendered = split(RENDERED, [PKEY, COMMENT, INDEX])  # the unique constraint's entry is missing
    assert not rendered.exact and rendered.blocks == []
    other = TocEntry("3196; 1259 157342 INDEX public ix postgres", 3196, "INDEX", "public", "ix")
    assert not split(RENDERED, [PKEY, UNIQUE, COMMENT, other]).exact  # another schema
    assert not split(RENDERED, [UNIQUE, PKEY, COMMENT, INDEX]).exact  # not in the list's order


def test_first_statement_splits_a_constraint_from_what_follows_it():
    head, rest = first_statement(
        '\nALTER TABLE ONLY t\n    ADD CONSTRAINT "a;b" PRIMARY KEY (id);\n\nALTER TABLE t CLUSTER ON "a;b";\n'
    )
    assert head == '\nALTER TABLE ONLY t\n    ADD CONSTRAINT "a;b" PRIMARY KEY (id);\n'
    assert rest == '\nALTER TABLE t CLUSTER ON "a;b";\n'


def test_a_deferrable_primary_key_with_quoted_names_is_attached_with_its_cluster_on_kept():
    block = split(RENDERED, [PKEY, UNIQUE, COMMENT, INDEX]).blocks[0]
    owned = Owned(
        157329,
        "constraint",
        unique_index='CREATE UNIQUE INDEX "p k""x" ON public."We""ird t" USING btree (id)',
        deferrable=True,
        deferred=True,
        primary=True,
        name='p k"x',
        index_name='p k"x',
    )
    table = SourceTable('public."We""ird t"', "public", 'We"ird t', ("id",), 10 << 20, 157329)
    assert _constraint_sql(block, owned, table) == (
        'ALTER TABLE ONLY "public"."We""ird t"\n'
        '    ADD CONSTRAINT "p k""x" PRIMARY KEY USING INDEX "p k""x" DEFERRABLE INITIALLY DEFERRED;\n'
        '\nALTER TABLE public."We""ird t" CLUSTER ON "p k""x";\n\n\n'
    )


def test_a_unique_constraint_is_attached_as_unique_whatever_its_name_says():
    sql = 'ALTER TABLE ONLY public.t\n    ADD CONSTRAINT "no PRIMARY KEY here" UNIQUE (a);\n'
    block = Block(
        TocEntry(
            "1; 2606 5 CONSTRAINT public t no PRIMARY KEY here x",
            1,
            "CONSTRAINT",
            "public",
            "t no PRIMARY KEY here",
        ),
        sql,
    )
    owned = Owned(
        4,
        "constraint",
        unique_index='CREATE UNIQUE INDEX "no PRIMARY KEY here" ON public.t USING btree (a)',
        name="no PRIMARY KEY here",
        index_name="no PRIMARY KEY here",
    )
    table = SourceTable("public.t", "public", "t", ("a",), 10 << 20, 4)
    assert _constraint_sql(block, owned, table) == (
        'ALTER TABLE ONLY "public"."t"\n    ADD CONSTRAINT "no PRIMARY KEY here" UNIQUE USING INDEX "no PRIMARY KEY here";\n'
    )


def test_a_constraint_without_a_prebuilt_index_is_left_as_it_is():
    block = Block(
        UNIQUE, "\nALTER TABLE ONLY public.b\n    ADD CONSTRAINT b_excl EXCLUDE USING gist (r WITH &&);\n"
    )
    table = SourceTable("public.b", "public", "b", ("r",), 10 << 20, 1)
    assert _constraint_sql(block, Owned(1, "constraint", "gist"), table) == block.sql
