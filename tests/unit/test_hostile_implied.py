"""Hostile review of stages.preflight.implied: text the regexes take for a plain key or
btree index, that Postgres parses as something else (and refuses, or runs otherwise)."""

from __future__ import annotations

import pytest

from stages.preflight.implied import is_plain_key


@pytest.mark.parametrize(
    ("desc", "sql"),
    [
        # Unquoted reserved words are not column names: these are expressions
        # (CURRENT_USER, CURRENT_DATE…), refused as not IMMUTABLE, or syntax errors.
        ("INDEX", "CREATE INDEX i ON public.t USING btree (user);"),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (current_date);"),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a, localtimestamp);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT k PRIMARY KEY (user);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT k UNIQUE (select);"),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES public.p(user);",
        ),
        # Not an index named "concurrently": CREATE INDEX CONCURRENTLY without a name,
        # which cannot run in the copy engine's transaction.
        ("INDEX", "CREATE INDEX concurrently ON public.t USING btree (a);"),
        # A table or schema named by a reserved word, unquoted: a syntax error.
        ("INDEX", "CREATE INDEX i ON from.t USING btree (a);"),
    ],
)
def test_reserved_words_in_place_of_names_are_not_plain_keys(desc, sql):
    assert not is_plain_key(desc, sql + "\n")


def test_a_quoted_name_holding_a_line_that_starts_with_dashes_hides_no_statement():
    """statement_of drops every line that starts with "--", also one inside a quoted
    name: here the entry is really three statements (an INSERT between two indexes,
    as psql runs it), but what the regex sees is one plain index on column "a\\n"."""
    block = (
        'CREATE INDEX i ON public.t USING btree ("a\n'
        '--"); INSERT INTO public.log VALUES (1); CREATE INDEX j ON public.t USING btree ("\n'
        '");'
    )
    assert not is_plain_key("INDEX", block)
