"""Which schema entries the rehearsal need not run (stages.preflight.implied)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from stages.preflight.implied import implied_entries, is_plain_key

HEADER = "--\n-- TOC entry 7 (class 2606 OID 16440)\n-- Name: t t_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\n"


@pytest.mark.parametrize(
    ("desc", "sql"),
    [
        (
            "CONSTRAINT",
            "ALTER TABLE ONLY public.many_0001\n    ADD CONSTRAINT many_0001_pkey PRIMARY KEY (id);",
        ),
        ("CONSTRAINT", 'ALTER TABLE ONLY "My Schema"."T"\n    ADD CONSTRAINT "T_u" UNIQUE (a, "B c");'),
        ("INDEX", "CREATE INDEX many_0001_label ON public.many_0001 USING btree (label);"),
        ("INDEX", "CREATE UNIQUE INDEX u ON ONLY public.parted USING btree (a, b);"),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.many_0001\n    ADD CONSTRAINT many_0001_parent_id_fkey FOREIGN KEY (parent_id) "
            "REFERENCES public.many_parent(id);",
        ),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT c_fk FOREIGN KEY (a, b) REFERENCES public.p(a, b) "
            "ON UPDATE CASCADE ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED NOT VALID;",
        ),
    ],
)
def test_plain_keys_and_btree_indexes_as_pg_dump_writes_them_are_implied(desc, sql):
    assert is_plain_key(desc, HEADER + sql + "\n\n")


@pytest.mark.parametrize(
    ("desc", "sql"),
    [
        ("INDEX", "CREATE INDEX i ON public.t USING btree (lower(label));"),  # an expression
        (
            "INDEX",
            "CREATE INDEX i ON public.t USING btree (label) WHERE (public.f(label) > 0);",
        ),  # a predicate
        ("INDEX", "CREATE INDEX i ON public.t USING gin (body public.gin_trgm_ops);"),  # another method
        ("INDEX", 'CREATE INDEX i ON public.t USING btree (label COLLATE "C");'),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (label text_pattern_ops);"),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a) INCLUDE (b);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT u UNIQUE NULLS NOT DISTINCT (a);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT x EXCLUDE USING gist (r WITH &&);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT c CHECK ((public.f(a) > 0));"),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES public.p(a) MATCH FULL;",
        ),
        # A second statement after a plain one: rehearsed.
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a);\nALTER TABLE public.t OWNER TO postgres;"),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a); SELECT public.evil();"),
        # The right text under another kind of entry.
        ("TRIGGER", "CREATE INDEX i ON public.t USING btree (a);"),
    ],
)
def test_anything_else_is_rehearsed(desc, sql):
    assert not is_plain_key(desc, HEADER + sql + "\n")


@dataclass(frozen=True)
class Entry:
    dump_id: int
    desc: str
    depends_on: tuple[int, ...] = ()


def test_a_plain_key_that_a_rehearsed_entry_needs_is_rehearsed():
    blocks = {
        1: "CREATE TABLE public.p (id integer);",
        2: "ALTER TABLE ONLY public.p\n    ADD CONSTRAINT p_pkey PRIMARY KEY (id);",
        3: "CREATE VIEW public.v AS SELECT p.id FROM public.p GROUP BY p.id;",
        4: "CREATE TABLE public.c (id integer);",
        5: "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT c_pkey PRIMARY KEY (id);",
        6: "CREATE INDEX c_id ON public.c USING btree (id);",
    }
    entries = [
        Entry(1, "TABLE"),
        Entry(2, "CONSTRAINT", (1,)),
        Entry(3, "VIEW", (1, 2)),  # groups by p's primary key: needs it
        Entry(4, "TABLE"),
        Entry(5, "CONSTRAINT", (4,)),
        Entry(6, "INDEX", (4,)),
    ]
    assert implied_entries(entries, blocks) == {5, 6}
