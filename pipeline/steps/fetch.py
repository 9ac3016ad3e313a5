"""The fetch stage: size up a live source (pipeline.steps.live), or check, plan and
count an upload (pipeline.steps.upload). Nothing is left on the worker's disk."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.steps import live
from pipeline.steps import upload as upload_steps
from pipeline.steps.results import FetchResult

if TYPE_CHECKING:
    from pipeline.import_steps import ImportSteps, StageContext


def run(steps: ImportSteps, context: StageContext) -> FetchResult:
    if not context.job.upload_key:
        return live.fetch(steps, context)
    return upload_steps.fetch_upload(
        context, settings=steps.settings, sealer=steps.sealer, store=steps.store, tools=steps._tools(context)
    )
