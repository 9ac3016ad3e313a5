"""A test extension with configuration tables (tests/fixtures/extensions), installed
into the local PostgreSQL's extension directory: no packaged extension on the allowlist
(PostGIS, whose `spatial_ref_sys` is one) is installed on these machines."""

from __future__ import annotations

import subprocess
from pathlib import Path

NAME = "capy_config_test"
FILES = Path(__file__).resolve().parents[1] / "fixtures" / "extensions"
PG_CONFIG = "/usr/lib/postgresql/15/bin/pg_config"


def install() -> None:
    """Copy the extension's control and script files where CREATE EXTENSION finds them
    (idempotent). The directory belongs to root: the tests run as root on the project's
    machines, as CI does."""
    share = subprocess.run([PG_CONFIG, "--sharedir"], check=True, capture_output=True, text=True)
    directory = Path(share.stdout.strip()) / "extension"
    for source in sorted(FILES.glob(f"{NAME}*")):
        target = directory / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            try:
                target.write_bytes(source.read_bytes())
            except PermissionError as err:
                raise RuntimeError(
                    f"cannot install the test extension {NAME} into {directory} ({err}); run the tests as root, "
                    f"or copy {FILES}/{NAME}* there once"
                ) from err
