"""Test helpers for the local Postgres: scratch databases, corpus loading, comparisons."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

ADMIN_URL = os.environ.get("CAPY_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# The sample databases (with their licences) live in the repository: tests need
# nothing from outside it.
CORPUS = Path(__file__).resolve().parents[1] / "corpus"


def url_for(dbname: str, **query: str) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname
    if query:
        base += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return base


@contextlib.contextmanager
def admin_cursor(dbname: str = "postgres") -> Iterator[psycopg2.extensions.cursor]:
    """A cursor of an autocommit superuser session in `dbname`, closed on the way out."""
    conn = psycopg2.connect(url_for(dbname))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def admin(sql_text: str | sql.Composed, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
    with admin_cursor(dbname) as cur:
        cur.execute(sql_text, params)
        return cur.fetchall() if cur.description else []


def scratch_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def create_db(name: str) -> str:
    admin(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
    return name


def drop_db(name: str) -> None:
    admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def spare_names() -> list[str]:
    """The cluster's spare databases (stages.database.spares), by name."""
    return [
        name for (name,) in admin("SELECT datname FROM pg_database WHERE left(datname, 11) = 'capy_spare_'")
    ]


def database_facts(name: str) -> tuple:
    """What a database is but for its name and oid: owner, encoding, locale, template,
    connections, limit, ACL (its owner written OWNER), tablespace."""
    [row] = admin(
        "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype, "
        "datlocprovider, datistemplate, datallowconn, datconnlimit, "
        "replace(datacl::text, pg_get_userbyid(datdba), 'OWNER'), dattablespace "
        "FROM pg_database WHERE datname = %s",
        (name,),
    )
    return row


def drop_spares() -> None:
    """Drop the cluster's spare databases (stages.database.spares) that services under
    test made."""
    for name in spare_names():
        drop_db(name)


def drop_made_by(control_url: str) -> None:
    """Drop what the service whose control database is at `control_url` made on this
    machine's cluster: its projects' databases, their replaced copies and previews, the
    projects' roles and the imports' restore roles."""
    conn = psycopg2.connect(control_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT database_name FROM projects UNION SELECT database_name FROM retired_databases "
                "UNION SELECT preview_database_id FROM jobs WHERE preview_database_id IS NOT NULL"
            )
            made = {name for (name,) in cur.fetchall()}
            cur.execute(
                "SELECT role_name FROM projects WHERE role_name IS NOT NULL "
                "UNION SELECT 'capy_restore_' || substr(id, 5) FROM jobs"
            )
            roles = [role for (role,) in cur.fetchall()]
    finally:
        conn.close()
    names = [
        name
        for (name,) in admin("SELECT datname FROM pg_database WHERE datname LIKE %s", ("capy_%",))
        if name in made or any(name.startswith(m + "_replaced_") for m in made)
    ]
    # Side by side: each DROP DATABASE waits for a checkpoint, which drops under way share
    # (hundreds at the end of a run: 27 s one after another). 64 empty databases took
    # 3.6 s in 8 threads and 2.0 s in 32 here.
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(drop_db, names))
    drop_roles(roles)


def drop_roles(roles: list[str]) -> None:
    """Drop those of `roles` that exist, over one connection: a run names a restore role
    for every job it made, most of them long dropped (a connection per name took 0.4 s
    more at the end of four test modules' run)."""
    with admin_cursor() as cur:
        cur.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,))
        for (role,) in cur.fetchall():
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def psql(dbname: str, *, file: Path | None = None, text: str | None = None, url: str | None = None) -> None:
    args = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url or url_for(dbname)]
    if file is not None:
        args += ["-f", str(file)]
    subprocess.run(args, input=text, text=True, check=True, capture_output=True)


def load_corpus(name: str, dbname: str, *, url: str | None = None) -> None:
    """Load a corpus database into an existing empty database `dbname` (or `url`)."""
    if name == "pagila":
        psql(dbname, file=CORPUS / "pagila-schema.sql", url=url)
        psql(dbname, file=CORPUS / "pagila-data.sql", url=url)
    elif name == "chinook":
        # chinook.sql drops and creates its own database; load its body into ours.
        body = (CORPUS / "chinook.sql").read_text(encoding="utf-8")
        body = re.sub(r"^(DROP DATABASE|CREATE DATABASE|\\c ).*$", "", body, flags=re.MULTILINE)
        psql(dbname, text=body, url=url)
    elif name == "northwind":
        psql(dbname, file=CORPUS / "northwind.sql", url=url)
    else:
        raise ValueError(name)


def schema_difference(a: str, b: str) -> str:
    """The unified diff of two databases' schema dumps ("" when they are the same)."""
    import difflib

    return "\n".join(
        difflib.unified_diff(schema_dump(a).splitlines(), schema_dump(b).splitlines(), a, b, lineterm="", n=2)
    )


def schema_dump(dbname: str) -> str:
    """pg_dump --schema-only, normalised for comparison between two databases."""
    out = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "-d", url_for(dbname)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # A source whose public schema has a non-default owner gets a "not creating
    # schema" note; owners are deliberately not replayed, so the note is not compared.
    out = re.sub(
        r"--\n-- Name: public; Type: SCHEMA; Schema: -; Owner: -\n--\n\n-- \*not\* creating schema, since initdb creates it\n",
        "",
        out,
    )
    lines = [
        line
        for line in out.splitlines()
        if line.strip()
        and not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))
    ]
    return "\n".join(lines)


def row_counts(dbname: str) -> dict[str, int]:
    conn = psycopg2.connect(url_for(dbname))
    try:
        from stages.database.inventory import count_rows

        return count_rows(conn)
    finally:
        conn.close()


def database_exists(name: str) -> bool:
    return bool(admin("SELECT 1 FROM pg_database WHERE datname = %s", (name,)))


def dump_with(dbname: str, path: Path, *options: str) -> Path:
    """`pg_dump` of `dbname` with `options` into `path`."""
    subprocess.run(
        ["pg_dump", *options, f"--file={path}", "-d", url_for(dbname)], check=True, capture_output=True
    )
    return path


def make_dump(dbname: str, fmt: str, path: Path) -> Path:
    """Dump `dbname` as custom, tar, plain or gzip-plain (pg_dump | gzip) to `path`."""
    url = url_for(dbname)
    if fmt == "gzip-plain":
        dump = subprocess.run(
            ["pg_dump", "--format=plain", "-d", url], check=True, capture_output=True
        ).stdout
        import gzip

        path.write_bytes(gzip.compress(dump))
        return path
    flag = {"custom": "--format=custom", "tar": "--format=tar", "plain": "--format=plain"}[fmt]
    subprocess.run(["pg_dump", flag, f"--file={path}", "-d", url], check=True, capture_output=True)
    return path
