"""Preflight: every reason an import would fail, found before anything changes.

One package: the report's vocabulary (`report`), the ordered registry of named checks
(`registry`), the checks live sources and uploads share (`checks`), the two sequences
(`live`, `upload`), what they read (`sourceinfo`, `targetinfo`, `providers`,
`extensions`) and the schema rehearsal (`rehearsal`, in a `sandbox` database).
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
