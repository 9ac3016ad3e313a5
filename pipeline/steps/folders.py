"""Each stage's own scratch folder on the worker's local disk.

A stage keeps its files in `CAPY_WORK_DIR/<job id>/<stage>-<random>/`, removed when the
stage ends, whether it succeeded or not: no stage reads a file another left, so any
worker, on any host, runs any stage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from pipeline.config import Settings
from pipeline.models import Job


@contextlib.contextmanager
def stage_folder(settings: Settings, job: Job, stage: str) -> Iterator[str]:
    """A folder of this stage's own under CAPY_WORK_DIR/<job id>/, removed (with the
    job's folder, when nothing else is in it) when the block ends, however it ends.

    What is already in the job's folder was left by an attempt whose worker was killed
    on this host (one attempt of one stage of a job runs at a time; one whose claim was
    lost is being stopped): it is removed first. The new folder has a name of its own,
    so such an attempt, as it ends, removes only its own."""
    job_dir = os.path.join(settings.work_dir, job.id)
    os.makedirs(job_dir, exist_ok=True)
    for left in os.listdir(job_dir):
        shutil.rmtree(os.path.join(job_dir, left), ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{stage}-", dir=job_dir)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(job_dir)
