"""Running the operators' CLI in-process, as its --json output reads."""

from __future__ import annotations

import json
from typing import Any

from pipeline.cli import main


def run(settings: Any, capsys: Any, *argv: str) -> tuple[int, Any]:
    """`capy-imports --json ARGV` against `settings`: its exit code and its one JSON line."""
    code = main(["--json", *argv], settings)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])
