"""detect_format on real pg_dump output of a scratch database on the local Postgres."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from stages.dumps.formats import DumpInfo, detect_format
from stages.errors import UnrecognizedDump

CONNECTION = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
ARCHIVE_VERSION = re.compile(r"1\.1[4-9]\.\d+")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH; install the PostgreSQL client tools")
    return path


def pg_args(database: str) -> list[str]:
    return ["-h", CONNECTION["host"], "-p", str(CONNECTION["port"]), "-U", CONNECTION["user"], "-d", database]


@pytest.fixture(scope="module")
def dumped_db() -> Iterator[str]:
    name = f"capy_dumpformat_{secrets.token_hex(4)}"
    admin = psycopg2.connect(dbname="postgres", **CONNECTION)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        try:
            with psycopg2.connect(dbname=name, **CONNECTION) as conn, conn.cursor() as cur:
                cur.execute(
                    "CREATE TABLE animals (id int PRIMARY KEY, name text NOT NULL);"
                    "INSERT INTO animals SELECT g, 'capybara ' || g FROM generate_series(1, 500) g;"
                )
            conn.close()
            yield name
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture(scope="module")
def versions(dumped_db: str) -> tuple[str, str]:
    """(pg_dump version, server version) as pg_dump writes them into a dump."""
    out = subprocess.run([tool("pg_dump"), "--version"], capture_output=True, text=True, check=True)
    dumped_by = out.stdout.strip().removeprefix("pg_dump (PostgreSQL) ")
    with psycopg2.connect(dbname=dumped_db, **CONNECTION) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        dumped_from = cur.fetchone()[0]
    conn.close()
    return dumped_by, dumped_from


def pg_dump(database: str, target: Path, *options: str) -> Path:
    subprocess.run([tool("pg_dump"), *pg_args(database), "-f", str(target), *options], check=True)
    return target


@pytest.mark.parametrize(
    ("options", "expected"), [(["-Fc"], "custom"), (["-Fc", "-Z0"], "custom"), (["-Ft"], "tar")]
)
def test_archives(
    dumped_db: str, versions: tuple[str, str], tmp_path: Path, options: list[str], expected: str
) -> None:
    info = detect_format(pg_dump(dumped_db, tmp_path / "dump", *options))
    assert info.format == expected
    assert info.archive_version is not None and ARCHIVE_VERSION.fullmatch(info.archive_version)
    assert (info.dumped_by, info.dumped_from) == versions


def test_plain(dumped_db: str, versions: tuple[str, str], tmp_path: Path) -> None:
    info = detect_format(pg_dump(dumped_db, tmp_path / "dump.sql", "-Fp"))
    assert info == DumpInfo("plain", None, *versions)


def test_plain_piped_through_gzip(dumped_db: str, versions: tuple[str, str], tmp_path: Path) -> None:
    target = tmp_path / "dump.sql.gz"
    with open(target, "wb") as out:
        dump = subprocess.Popen([tool("pg_dump"), *pg_args(dumped_db), "-Fp"], stdout=subprocess.PIPE)
        gzip = subprocess.run([tool("gzip"), "-c"], stdin=dump.stdout, stdout=out, check=True)
        assert dump.stdout is not None
        dump.stdout.close()
        assert dump.wait() == 0 and gzip.returncode == 0
    assert detect_format(target) == DumpInfo("gzip-plain", None, *versions)


def test_pg_dumpall_output_is_refused_naming_pg_dump(tmp_path: Path) -> None:
    target = tmp_path / "globals.sql"
    args = ["-h", CONNECTION["host"], "-p", str(CONNECTION["port"]), "-U", CONNECTION["user"]]
    subprocess.run([tool("pg_dumpall"), *args, "--globals-only", "-f", str(target)], check=True)
    with pytest.raises(UnrecognizedDump, match="pg_dumpall output .* dump the one database with pg_dump"):
        detect_format(target)


def test_directory_format_toc_is_refused(dumped_db: str, tmp_path: Path) -> None:
    directory = pg_dump(dumped_db, tmp_path / "dir", "-Fd")
    with pytest.raises(UnrecognizedDump, match="directory-format"):
        detect_format(directory / "toc.dat")


def test_tar_of_a_directory_dump_is_refused(dumped_db: str, tmp_path: Path) -> None:
    pg_dump(dumped_db, tmp_path / "dir", "-Fd")
    archive = tmp_path / "dir.tar"
    subprocess.run([tool("tar"), "-cf", str(archive), "-C", str(tmp_path), "dir"], check=True)
    with pytest.raises(UnrecognizedDump, match=r"tar archive of a directory-format dump \(pg_dump -Fd\)"):
        detect_format(archive)


def test_zip_of_a_directory_dump_is_refused(dumped_db: str, tmp_path: Path) -> None:
    directory = pg_dump(dumped_db, tmp_path / "dir", "-Fd")
    archive = tmp_path / "dir.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for member in sorted(directory.iterdir()):
            zf.write(member, f"dir/{member.name}")
    with pytest.raises(UnrecognizedDump, match="zip archive of a directory-format dump"):
        detect_format(archive)
