"""A test extension with configuration tables (tests/fixtures/extensions), installed
into the local PostgreSQL's extension directory: no packaged extension on the allowlist
(PostGIS, whose `spatial_ref_sys` is one) is installed on these machines."""

from __future__ import annotations

import subprocess
from pathlib import Path

NAME = "capy_config_test"
FILES = Path(__file__).resolve().parents[1] / "fixtures" / "extensions"
PG_CONFIG = "/usr/lib/postgresql/15/bin/pg_config"


# A source using the extension: the user's own configuration rows beside its, and a table.
SOURCE_SQL = """
CREATE SCHEMA capy_config;
CREATE EXTENSION capy_config_test SCHEMA capy_config;
INSERT INTO capy_config.settings (name, value) VALUES ('tenant_a', 'x'), ('tenant_b', 'y');
INSERT INTO capy_config_jobs.schedule (name, every) VALUES ('vacuum', '1 day'), ('report', '7 days');
CREATE TABLE public.notes (id int PRIMARY KEY);
INSERT INTO public.notes VALUES (1);
"""


def directory() -> Path:
    """Where the local PostgreSQL's CREATE EXTENSION finds control and script files."""
    share = subprocess.run([PG_CONFIG, "--sharedir"], check=True, capture_output=True, text=True)
    return Path(share.stdout.strip()) / "extension"


def install() -> None:
    """Copy the extension's control and script files where CREATE EXTENSION finds them
    (idempotent). The directory belongs to root: the tests run as root on the project's
    machines, as CI does."""
    directory_ = directory()
    for source in sorted(FILES.glob(f"{NAME}*")):
        target = directory_ / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            try:
                target.write_bytes(source.read_bytes())
            except PermissionError as err:
                raise RuntimeError(
                    f"cannot install the test extension {NAME} into {directory_} ({err}); run the tests as root, "
                    f"or copy {FILES}/{NAME}* there once"
                ) from err
