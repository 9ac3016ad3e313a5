"""Running the stage chain in-process: the real Runner and steps, without a broker."""

from __future__ import annotations

from collections import deque

from pipeline.config import Settings
from pipeline.import_steps import ImportSteps
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from pipeline.services import object_store
from stages.errors import TransientError


class InlineQueue:
    """Records wake-ups and runs them in order, retrying transient failures like Dramatiq."""

    def __init__(self, settings: Settings) -> None:
        self.woken: deque[tuple[str, str]] = deque()
        self.runner = Runner(
            settings,
            ImportSteps(settings, Sealer(settings.secret_key), object_store(settings)),
            self.wake,
            heartbeat_seconds=1,
        )
        self.settings = settings

    def wake(self, job_id: str, stage: str, delay_ms: int = 0) -> None:
        """In-process there is no one else to wait for: a delayed wake-up runs in turn."""
        self.woken.append((job_id, stage))

    def drain(self) -> None:
        while self.woken:
            job_id, stage = self.woken.popleft()
            for _attempt in range(self.settings.max_attempts + 1):
                try:
                    self.runner.run(job_id, stage)
                    break
                except TransientError:
                    continue
            else:
                self.runner.exhausted(job_id, stage)
