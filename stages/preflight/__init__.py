"""Preflight: every reason an import would fail, found before anything changes.

One package: the report's vocabulary (`report`), the ordered registry of named checks
(`registry`), the checks live sources and uploads share (`checks`), the two sequences
(`live`, `upload`), what they read (`sourceinfo`, `targetinfo`, `providers`,
`extensions`) and the schema rehearsal (`rehearsal` for archives and live sources,
`plainrehearsal` for plain scripts, in a `sandbox` database).

Where to add a check: its function in the module of what it reads, one line in
`registry.REGISTRY` (its name, which sequences run it, what it asks), and its call in
`live.check_live_source` and/or `upload.check_upload_head`; reports are put in registry
order (`Preflight.in_order`), and the tests, which read the names from the registry,
fail until the sequences report it.
The sequences are imported from their modules (`stages.preflight.live`,
`stages.preflight.upload`): the dump readers they use import this package's vocabulary.
"""

from stages.preflight.registry import LIVE_CHECKS, OBJECT_CHECKS, REGISTRY, SCHEMA_REHEARSAL, UPLOAD_CHECKS
from stages.preflight.report import FAIL, PASS, WARN, Check, Findings, Preflight, Target, human_bytes

__all__ = [
    "FAIL",
    "LIVE_CHECKS",
    "OBJECT_CHECKS",
    "PASS",
    "REGISTRY",
    "SCHEMA_REHEARSAL",
    "UPLOAD_CHECKS",
    "WARN",
    "Check",
    "Findings",
    "Preflight",
    "Target",
    "human_bytes",
]
