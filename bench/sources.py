"""Building the generated sources once per (dataset, scale) and reusing them."""

from __future__ import annotations

from collections.abc import Callable

from psycopg2 import sql

from bench.datasets import Source, dataset_sql, fingerprint, source_name
from bench.pg import Cluster


def _comment(cluster: Cluster, dbname: str) -> str | None:
    found = cluster.query(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (dbname,)
    )
    return found[0][0] if found else None


def ensure_source(
    cluster: Cluster,
    dataset: str,
    scale: float,
    *,
    rebuild: bool = False,
    say: Callable[[str], None] = print,
) -> Source:
    """The source of `dataset` at `scale`, built now if it is missing, was built by another
    version of the generator, or `rebuild` is asked.

    It is built under a temporary name and renamed when complete, so an interrupted build
    is never mistaken for a source; it is vacuumed (freeze, analyze) so every method reads
    a settled table, not one whose first reader sets hint bits.
    """
    name = source_name(dataset, scale)
    wanted = fingerprint(dataset, scale)
    if cluster.exists(name) and not rebuild and _comment(cluster, name) == wanted:
        return Source(dataset, scale, name, cluster.size(name), built=False)
    if cluster.exists(name):
        say(f"rebuilding {name}" + ("" if rebuild else " (made by another version of the generator)"))
    else:
        say(f"building {name} (once; later runs reuse it)")
    building = name + "__building"
    cluster.drop(building)
    cluster.create(building)
    try:
        cluster.psql(building, dataset_sql(dataset, scale))
        cluster.psql(building, "VACUUM (FREEZE, ANALYZE);")
    except BaseException:
        cluster.drop(building)
        raise
    cluster.drop(name)
    cluster.query(
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(building), sql.Identifier(name))
    )
    cluster.query(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(wanted)))
    return Source(dataset, scale, name, cluster.size(name), built=True)
