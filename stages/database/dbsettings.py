"""Database-level settings and the database's comment: read from the dump, carried over
as the project's role may, and reported.

pg_dump keeps them outside the database's objects: `ALTER DATABASE … SET …`,
`ALTER ROLE … IN DATABASE … SET …` (one DATABASE PROPERTIES entry) and
`COMMENT ON DATABASE …` (a COMMENT entry). An archive (custom, tar, or the directory
dump of a live source) always holds these entries; pg_restore shows and restores them
only with `--create`, which an import never runs. So they are read here on their own,
from the statements pg_dump wrote for them, and re-issued against the imported database
by the service (parameters and identifiers quoted by the driver, never the dump's SQL).

What is applied and what is not:
- a database setting is set with `ALTER DATABASE <imported> SET`, as the project's
  role (the database's owner): user-context settings pass; a superuser-only one is
  refused by the server and reported as skipped with the server's reason;
- a role's setting in the database is skipped: roles are not imported;
- the comment is set by the owner.
Settings and comment belong to the database (its OID), so set on the preview they
survive the swap that renames it to the project's database name.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql

from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.dumps import toc
from stages.tools.commands import PgTools

_IDENT = r'(?:"(?:[^"]|"")*"|[^\s".;]+)'
_LITERALS = r"'(?:[^']|'')*'(?:, '(?:[^']|'')*')*"
_DATABASE_SET = re.compile(
    rf"^ALTER DATABASE {_IDENT} SET ({_IDENT}(?:\.{_IDENT})?) TO ({_LITERALS});$", re.M
)
_ROLE_SET = re.compile(
    rf"^ALTER ROLE ({_IDENT}) IN DATABASE {_IDENT} SET ({_IDENT}(?:\.{_IDENT})?) TO ({_LITERALS});$", re.M
)
_COMMENT = re.compile(rf"^COMMENT ON DATABASE {_IDENT} IS ('(?:[^']|'')*');$", re.M)
_LITERAL = re.compile(r"'((?:[^']|'')*)'")


@dataclass(frozen=True)
class Setting:
    """`ALTER DATABASE … SET name TO values` (`role` None) or its per-role form."""

    name: str
    values: list[str]
    role: str | None = None

    @property
    def shown(self) -> str:
        value = ", ".join(self.values)
        where = f" for role {self.role}" if self.role else ""
        return f"{self.name} = {value}{where}"


@dataclass
class DatabaseProperties:
    settings: list[Setting] = field(default_factory=list)
    comment: str | None = None

    def facts(self) -> dict[str, Any]:
        return {"settings": [asdict(s) for s in self.settings], "comment": self.comment}

    @classmethod
    def from_facts(cls, facts: dict[str, Any] | None) -> DatabaseProperties:
        facts = facts or {}
        return cls([Setting(**s) for s in facts.get("settings", [])], facts.get("comment"))


def _unquote(identifier: str) -> str:
    return ".".join(toc.unquote(part) for part in re.findall(r'"(?:[^"]|"")*"|[^.]+', identifier))


def _literals(text: str) -> list[str]:
    return [value.replace("''", "'") for value in _LITERAL.findall(text)]


def parse(text: str) -> DatabaseProperties:
    """The settings and comment in pg_dump's statements for them (see module doc)."""
    settings = [Setting(_unquote(name), _literals(values)) for name, values in _DATABASE_SET.findall(text)]
    settings += [
        Setting(_unquote(name), _literals(values), toc.unquote(role))
        for role, name, values in _ROLE_SET.findall(text)
    ]
    comment = _COMMENT.search(text)
    return DatabaseProperties(settings, _literals(comment.group(1))[0] if comment else None)


def read_archive(
    tools: PgTools,
    archive: str,
    work_dir: str,
    database_entries: list[toc.TocEntry],
    *,
    encoding: str = "UTF8",
) -> DatabaseProperties:
    """The database's settings and comment held by an archive (custom, tar or
    directory), from its database's own entries (stages.dumps.toc.read_with_database);
    empty when it holds none."""
    entries = database_entries
    wanted = [
        e
        for e in entries
        if e.desc == "DATABASE PROPERTIES" or (e.desc == "COMMENT" and e.name.startswith("DATABASE "))
    ]
    if not wanted:
        return DatabaseProperties()
    list_path = os.path.join(work_dir, "database.list")
    with open(list_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(e.line for e in wanted) + "\n")
    chunks: list[bytes] = []
    tools.pg_restore.run_streaming(
        ["--create", f"--use-list={list_path}", "--file=-", archive],
        lambda out: chunks.append(out.read()),
        what="reading the dump's database settings",
    )
    return parse(b"".join(chunks).decode(toc.python_codec(encoding), "replace"))


ROLES_NOT_IMPORTED = (
    "roles are not imported; set it for a role of the project with ALTER ROLE … IN DATABASE … SET"
)


def apply(
    admin: ClusterAdmin, database: str, owner: RoleLogin, properties: DatabaseProperties
) -> dict[str, Any]:
    """Set `properties` on `database` as its owner; what was carried and what was
    skipped (with the reason), as the report shows them."""
    carried: list[str] = []
    skipped: list[dict[str, str]] = []
    wanted = [s for s in properties.settings if s.role is None]
    for setting in properties.settings:
        if setting.role is not None:
            skipped.append({"object": f"DATABASE SETTING {setting.shown}", "reason": ROLES_NOT_IMPORTED})
    if not wanted and properties.comment is None:
        return {"settings": carried, "comment": None, "skipped": skipped}
    comment = None
    with admin.role_connection(database, owner, readonly=False) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            for setting in wanted:
                statement = sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
                    sql.Identifier(database),
                    sql.SQL(".").join(sql.Identifier(part) for part in setting.name.split(".")),
                    sql.SQL(", ").join(sql.Literal(value) for value in setting.values),
                )
                try:
                    cur.execute(statement)
                except psycopg2.Error as err:
                    reason = (err.pgerror or str(err)).strip().splitlines()[0].removeprefix("ERROR:").strip()
                    skipped.append(
                        {
                            "object": f"DATABASE SETTING {setting.shown}",
                            "reason": f"the project's role may not set it ({reason})",
                        }
                    )
                else:
                    carried.append(setting.shown)
            if properties.comment is not None:
                cur.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS %s").format(sql.Identifier(database)),
                    (properties.comment,),
                )
                comment = properties.comment
    return {"settings": carried, "comment": comment, "skipped": skipped}
