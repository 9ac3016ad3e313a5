"""Wall-clock limits: how long something may take, and which setting says so.

A `Limit` is the rule ("3 hours, CAPY_COMMAND_TIMEOUT_SECONDS, and what to do when it
is reached"); a `Deadline` is that rule started at an instant of the monotonic clock,
so it can travel with the tools of a job and be combined with others (the earliest
one wins). Messages name the setting, so an operator knows what to change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


def seconds_text(value: float) -> str:
    """ "14400" for 14400.0, "0.5" for 0.5: the way a setting would be written."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Limit:
    """`seconds` allowed by `setting`; `advice` says what to do when it is reached;
    `label` names it in messages ("the import's time limit of ")."""

    seconds: float
    setting: str
    advice: str
    label: str = ""

    def describe(self) -> str:
        return f"{self.label}{seconds_text(self.seconds)} s ({self.setting})"


@dataclass(frozen=True)
class Deadline:
    """An instant of `time.monotonic()` by which the work must be done, and its rule."""

    at: float
    limit: Limit

    @classmethod
    def after(cls, limit: Limit, *, clock: Clock = time.monotonic) -> Deadline:
        return cls(clock() + limit.seconds, limit)

    @classmethod
    def within(cls, remaining: float, limit: Limit, *, clock: Clock = time.monotonic) -> Deadline:
        """A deadline `remaining` seconds from now for a limit that started earlier
        (a job's time limit, counted from when the job started)."""
        return cls(clock() + remaining, limit)

    def remaining(self, *, clock: Clock = time.monotonic) -> float:
        return self.at - clock()

    @staticmethod
    def earliest(*deadlines: Deadline | None) -> Deadline:
        present = [deadline for deadline in deadlines if deadline is not None]
        if not present:
            raise ValueError("no deadline given")
        return min(present, key=lambda deadline: deadline.at)
