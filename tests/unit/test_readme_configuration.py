"""README.md's "Configuration" table agrees with the settings: every setting's variable
is listed with its default, and every variable listed is a setting or is read by the
process files (Procfile, Procfile.dev, compose.yaml, Dockerfile)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import Settings, env_vars

ROOT = Path(__file__).resolve().parents[2]
PROCESS_FILES = ("Procfile", "Procfile.dev", "compose.yaml", "Dockerfile")


def configuration_table(readme: str) -> dict[str, str]:
    """{variable: its row's default cell} of the table under "## Configuration"."""
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or set(cells[0]) <= set("-: "):
            continue
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            rows[name] = "|".join(cells[1:])
    return rows


def readme_default(name: str) -> tuple[str | None, bool]:
    """How the README writes the default of field `name`, and whether in backticks
    (None: no default; the README's cell then starts with "unset" or "required")."""
    default = Settings.model_fields[name].default
    if isinstance(default, bool):
        return ("true" if default else "false"), True
    if isinstance(default, tuple):
        if not default:
            return None, False
        if all(isinstance(item, str) for item in default):
            return ", ".join(default), False
        return ",".join(f"{item:g}" for item in default), True
    if default == "":
        return None, False
    return str(default), True


def table_problems(readme: str, process_text: str) -> list[str]:
    """What README.md's table gets wrong about the settings; [] when it agrees."""
    table = configuration_table(readme)
    problems = []
    for name, variable in env_vars().items():
        if variable not in table:
            problems.append(f"{variable} is not in the table")
            continue
        cell = table[variable]
        text, quoted = readme_default(name)
        if text is None:
            if not cell.startswith(("unset", "required")):
                problems.append(
                    f"{variable}: its default cell should start with 'unset' or 'required': {cell!r}"
                )
        elif (f"`{text}`" if quoted else text) not in cell:
            problems.append(f"{variable}: its default {text!r} is not in its cell {cell!r}")
    known = set(env_vars().values())
    for variable in table:
        if variable not in known and not re.search(r"\$\{?" + variable + r"\b", process_text):
            problems.append(f"{variable} is in the table but is neither a setting nor read by a process file")
    return problems


def _process_text() -> str:
    return "\n".join((ROOT / name).read_text() for name in PROCESS_FILES if (ROOT / name).exists())


def test_the_readme_table_agrees_with_the_settings():
    assert table_problems((ROOT / "README.md").read_text(), _process_text()) == []


def test_the_check_finds_a_missing_row_a_wrong_default_and_an_unknown_variable():
    readme = (ROOT / "README.md").read_text()
    lease = "| `CAPY_LEASE_SECONDS` | `90`"
    body = "| `CAPY_MAX_BODY_BYTES` | `65536`"
    assert lease in readme and body in readme
    broken = readme.replace(lease, "| `CAPY_LEASE_SECONDS` | `60`").replace(
        body, "| `CAPY_MAX_BODY_SIZE` | `65536`"
    )
    problems = table_problems(broken, _process_text())
    assert len(problems) == 3
    assert problems[0] == "CAPY_MAX_BODY_BYTES is not in the table"
    assert problems[1].startswith("CAPY_LEASE_SECONDS: its default '90' is not in its cell '`60`")
    assert (
        problems[2]
        == "CAPY_MAX_BODY_SIZE is in the table but is neither a setting nor read by a process file"
    )


def test_a_variable_only_the_procfile_reads_belongs_in_the_table():
    readme = (ROOT / "README.md").read_text()
    process_only = [name for name in configuration_table(readme) if name not in set(env_vars().values())]
    assert "CAPY_WORKER_THREADS" in process_only
    assert table_problems(readme, "") == [
        f"{name} is in the table but is neither a setting nor read by a process file" for name in process_only
    ]
