"""The generated source databases of the benchmark, deterministic for a scale.

`dataset_sql(name, scale)` is the whole SQL script that fills an empty database: data is
made server-side with `generate_series`, and every "random" value comes from `md5` of
the row's number and a fixed salt, so two builds at one scale hold identical rows.
`ensure_source` builds a source once per (dataset, scale) and reuses it afterwards: the
database carries a fingerprint of the script it was built from (its comment), and a
source built by another version of this module is built again.

Shapes at scale 1 (the row counts scale linearly; table counts do not):

- `mix` (about 1.5 GB): accounts 200k, events 5M with a composite index, documents 200k
  with a trigram GIN index (pg_trgm), and 200 small tables of 100 rows.
- `narrow`: one table of 20M (bigint, integer) rows with a primary key.
- `many`: 2,000 tables of 100 rows, each with a primary key, an index and a foreign key
  to one shared parent table.
- `tiny` (about 10 MB): customers 20k, orders 80k (identity key, foreign key, index), a view.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

DATASETS = ("mix", "narrow", "many", "tiny")
GENERATOR_VERSION = 1


def rows(base: int, scale: float) -> int:
    """`base` rows at scale 1, at least one."""
    return max(1, round(base * scale))


def scale_tag(scale: float) -> str:
    """0.3 -> "0_3", 1 -> "1", 0.02 -> "0_02": the scale as it appears in a database name."""
    if scale <= 0:
        raise ValueError(f"the scale must be above 0, not {scale}")
    return format(scale, "g").replace(".", "_").replace("-", "m").replace("+", "")


def source_name(dataset: str, scale: float) -> str:
    """The source database of `dataset` at `scale`, e.g. capybench_mix_s0_3."""
    return f"capybench_{dataset}_s{scale_tag(scale)}"


def _rand(seed_sql: str) -> str:
    """A non-negative pseudo-random int4 derived from `seed_sql` (an SQL text expression)."""
    return f"(('x' || substr(md5({seed_sql}), 1, 8))::bit(32)::int & 2147483647)"


# Timestamps count from a fixed instant in UTC so the session's time zone changes nothing.
EPOCH = "timestamptz '2020-01-01 00:00:00+00'"

# A vocabulary of 4,096 pseudo-words (letters only) for text that a trigram index can
# chew on; TEMP, so it is not part of the dataset.
_VOCABULARY = """
CREATE TEMP TABLE vocab AS
SELECT k, translate(substr(md5('w' || k), 1, 3 + k % 7), '0123456789', 'qrstuvwxyz') AS word
FROM generate_series(0, 4095) AS k;
CREATE UNIQUE INDEX ON vocab (k);
ANALYZE vocab;
"""


def _words(seed_sql: str, count: int) -> str:
    """SQL for `count` space-separated vocabulary words chosen by `seed_sql`."""
    return (
        f"(SELECT string_agg(v.word, ' ' ORDER BY j) FROM generate_series(1, {count}) AS j "
        f"JOIN vocab AS v ON v.k = {_rand(f'{seed_sql} || {chr(39)}:{chr(39)} || j')} % 4096)"
    )


def _mix(scale: float) -> str:
    accounts, events, documents = rows(200_000, scale), rows(5_000_000, scale), rows(200_000, scale)
    return f"""
CREATE EXTENSION IF NOT EXISTS pg_trgm;
{_VOCABULARY}
CREATE TABLE accounts (
    id bigint NOT NULL,
    email text NOT NULL,
    name text NOT NULL,
    plan text NOT NULL,
    created_at timestamptz NOT NULL,
    balance numeric(12, 2) NOT NULL
);
INSERT INTO accounts
SELECT i, 'user' || i || '@example.com', initcap({_words("'n' || i", 2)}),
       (ARRAY['free', 'pro', 'team'])[1 + {_rand("'p' || i")} % 3],
       {EPOCH} + ({_rand("'c' || i")} % 100000000) * interval '1 second',
       ({_rand("'b' || i")} % 10000000) / 100.0
FROM generate_series(1, {accounts}) AS i;
ALTER TABLE accounts ADD PRIMARY KEY (id);
ALTER TABLE accounts ADD UNIQUE (email);

CREATE TABLE events (
    id bigint NOT NULL,
    account_id bigint NOT NULL,
    kind smallint NOT NULL,
    created_at timestamptz NOT NULL,
    amount numeric(10, 2),
    payload text NOT NULL
);
INSERT INTO events
SELECT i, 1 + {_rand("'a' || i")} % {accounts}, ({_rand("'k' || i")} % 12)::smallint,
       {EPOCH} + ({_rand("'t' || i")} % 150000000) * interval '1 second',
       CASE WHEN i % 7 = 0 THEN NULL ELSE ({_rand("'m' || i")} % 1000000) / 100.0 END,
       md5('p' || i) || md5('q' || i)
FROM generate_series(1, {events}) AS i;
ALTER TABLE events ADD PRIMARY KEY (id);
ALTER TABLE events ADD FOREIGN KEY (account_id) REFERENCES accounts (id);
CREATE INDEX events_account_created ON events (account_id, created_at);

CREATE TABLE documents (
    id bigint NOT NULL,
    account_id bigint NOT NULL,
    title text NOT NULL,
    body text NOT NULL
);
INSERT INTO documents
SELECT i, 1 + {_rand("'o' || i")} % {accounts}, {_words("'h' || i", 5)}, {_words("'d' || i", 150)}
FROM generate_series(1, {documents}) AS i;
ALTER TABLE documents ADD PRIMARY KEY (id);
ALTER TABLE documents ADD FOREIGN KEY (account_id) REFERENCES accounts (id);
CREATE INDEX documents_body_trgm ON documents USING gin (body gin_trgm_ops);

DO $$
BEGIN
    FOR t IN 1..200 LOOP
        EXECUTE format(
            'CREATE TABLE %I (id integer PRIMARY KEY, code text NOT NULL, value integer NOT NULL)',
            'small_' || lpad(t::text, 3, '0'));
        EXECUTE format(
            'INSERT INTO %I SELECT i, md5(%L || i), i * %s FROM generate_series(1, 100) AS i',
            'small_' || lpad(t::text, 3, '0'), 's' || t || ':', t);
    END LOOP;
END
$$;
"""


def _narrow(scale: float) -> str:
    return f"""
CREATE TABLE narrow (id bigint NOT NULL, v integer NOT NULL);
INSERT INTO narrow SELECT i, {_rand("'v' || i")} FROM generate_series(1, {rows(20_000_000, scale)}) AS i;
ALTER TABLE narrow ADD PRIMARY KEY (id);
"""


def _many(scale: float) -> str:
    per_table = rows(100, scale)
    # One transaction per table (COMMIT inside DO, run by psql in autocommit): a single
    # transaction would need a lock per table and index, past max_locks_per_transaction.
    return f"""
CREATE TABLE parent (id integer PRIMARY KEY, name text NOT NULL);
INSERT INTO parent SELECT i, md5('parent' || i) FROM generate_series(1, 1000) AS i;
DO $$
DECLARE
    name text;
BEGIN
    FOR t IN 1..2000 LOOP
        name := 'many_' || lpad(t::text, 4, '0');
        EXECUTE format(
            'CREATE TABLE %I (id integer PRIMARY KEY, parent_id integer NOT NULL REFERENCES parent (id), '
            'label text NOT NULL)', name);
        EXECUTE format(
            'INSERT INTO %I SELECT i, 1 + (i * %s) %% 1000, md5(%L || i) FROM generate_series(1, {per_table}) AS i',
            name, t, name);
        EXECUTE format('CREATE INDEX %I ON %I (label)', name || '_label', name);
        COMMIT;
    END LOOP;
END
$$;
"""


def _tiny(scale: float) -> str:
    customers, orders = rows(20_000, scale), rows(80_000, scale)
    return f"""
CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE
);
INSERT INTO customers SELECT i, 'customer ' || i, 'c' || i || '@example.com' FROM generate_series(1, {customers}) AS i;
CREATE TABLE orders (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    total numeric(10, 2) NOT NULL CHECK (total >= 0),
    placed_at timestamptz NOT NULL,
    note text
);
INSERT INTO orders (id, customer_id, total, placed_at, note)
SELECT i, 1 + {_rand("'u' || i")} % {customers}, ({_rand("'v' || i")} % 100000) / 100.0,
       {EPOCH} + ({_rand("'w' || i")} % 50000000) * interval '1 second', md5('n' || i)
FROM generate_series(1, {orders}) AS i;
SELECT setval(pg_get_serial_sequence('orders', 'id'), {orders});
CREATE INDEX orders_customer ON orders (customer_id, placed_at);
CREATE VIEW customer_totals AS
    SELECT customer_id, count(*) AS orders, sum(total) AS total FROM orders GROUP BY customer_id;
"""


_BUILDERS: dict[str, Callable[[float], str]] = {"mix": _mix, "narrow": _narrow, "many": _many, "tiny": _tiny}


def dataset_sql(dataset: str, scale: float) -> str:
    """The SQL script that fills an empty database with `dataset` at `scale`."""
    if dataset not in _BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    scale_tag(scale)  # refuses a scale <= 0
    return _BUILDERS[dataset](scale)


def fingerprint(dataset: str, scale: float) -> str:
    """What a built source's comment records: the generator version and the script's hash."""
    digest = hashlib.sha256(dataset_sql(dataset, scale).encode()).hexdigest()[:16]
    return f"capybench v{GENERATOR_VERSION} {dataset} scale={scale:g} sql={digest}"


@dataclass(frozen=True)
class Source:
    """A built source database."""

    dataset: str
    scale: float
    database: str
    size_bytes: int
    built: bool  # True if this run built it, False if an earlier run's was reused
