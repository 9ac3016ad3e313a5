"""The stages of an import, in order: the one list the rest derives from.

The `Stage` enum and `STAGE_ORDER` (pipeline.models), the queue's actors
(pipeline.queue), what follows a stage (pipeline.jobs.next_stage) and the tests that go
through every stage are built from `STAGES`. Adding a stage: a module under
pipeline/steps/ with a `run(steps, context)` returning its result model (declared in
pipeline.steps.results, and added to `JobFacts`), one line here, and the stage's name in
the jobs table's CHECK constraint (a migration; tests/unit/test_stage_registry.py
checks they agree).

A spec names its module rather than holding its function: the stage modules use the
job models and the job state machine, which are built from this list, so it cannot
import them; the function is looked up when a stage first runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.steps.results import FetchResult, FinalizeResult, PreflightResult, RestoreResult, StageResult

if TYPE_CHECKING:
    from pipeline.import_steps import ImportSteps, StageContext

StageFunction = Callable[["ImportSteps", "StageContext"], StageResult]


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (queue, enum value, `jobs.stage`), the module whose
    `run(steps, context)` does it, and the result model that returns."""

    name: str
    module: str
    result: type[StageResult]

    @property
    def run(self) -> StageFunction:
        function: StageFunction = importlib.import_module(self.module).run
        return function


STAGES: tuple[StageSpec, ...] = (
    StageSpec("preflight", "pipeline.steps.preflight", PreflightResult),
    StageSpec("fetch", "pipeline.steps.fetch", FetchResult),
    StageSpec("restore", "pipeline.steps.restore", RestoreResult),
    StageSpec("finalize", "pipeline.steps.finalize", FinalizeResult),
)

STAGE_NAMES: tuple[str, ...] = tuple(spec.name for spec in STAGES)


def load_stages() -> None:
    """Import every stage's module (and the toolkit it imports) now: a worker does at
    start, so that its first job's stages do not pay for it (a quarter second)."""
    for spec in STAGES:
        importlib.import_module(spec.module)


def spec_of(name: str) -> StageSpec:
    """The stage called `name`; KeyError if there is none."""
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"no stage is called {name!r}")
