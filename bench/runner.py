"""The harness: every method on every dataset, rounds alternating, each copy verified.

Rounds run the methods in mirrored pairs, each pair rotated by one (A B C, C B A, then
B C A, A C B…), so no method always runs first on a cold cache, last on a machine warmed
by the others, or right after the same method.
Each copy goes into a fresh database (the baselines) or a fresh project (the service),
is verified against the source's shape, then dropped before the next one starts.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.datasets import Source
from bench.methods import UPLOAD, Method, Trial
from bench.pg import Cluster, run
from bench.report import Result, Round
from bench.sources import ensure_source
from bench.verify import Shape, compare, shape

DEFAULT_ROUNDS = 3


@dataclass(frozen=True)
class Rounds:
    """Rounds per method: `default` for every dataset but those `by_dataset` names.

    A dataset whose rounds take seconds (`many`, `tiny`) can have more of them for the
    price of one round of `mix`: its medians then rest on more rounds, where the
    machine's noise is as large as the differences measured."""

    default: int = DEFAULT_ROUNDS
    by_dataset: Mapping[str, int] = field(default_factory=dict)

    def of(self, dataset: str) -> int:
        return self.by_dataset.get(dataset, self.default)


@dataclass(frozen=True)
class Plan:
    datasets: Sequence[str]
    scale: float
    rounds: Rounds | int
    methods: Sequence[Method]
    rebuild: bool = False

    def rounds_of(self, dataset: str) -> int:
        return self.rounds if isinstance(self.rounds, int) else self.rounds.of(dataset)


def rotated(methods: Sequence[Method], round_index: int) -> list[Method]:
    """The methods in round `round_index`'s order: rounds come in pairs, the second the
    first reversed, and each pair starts one method later (A B C, C B A, B C A, A C B…).

    A rotation alone kept the methods' cyclic order, so each method always ran right
    after the same one (the service's upload after `pg_restore -j2`'s, which left it
    10-25 s slower on `mix`); reversed, a method follows the one it preceded."""
    if not methods:
        return []
    k = (round_index // 2) % len(methods)
    order = [*methods[k:], *methods[:k]]
    return order[::-1] if round_index % 2 else order


def run_once(method: Method, trial: Trial, expected: Shape, say: Callable[[str], None] = print) -> Round:
    """Run one copy and verify it; a copy that fails or differs from `expected` is a failed round."""
    try:
        timed = method.run(trial)
    except Exception as err:  # noqa: BLE001 - any failure of a method is recorded, and the bench goes on
        problems = [f"the copy failed: {err}"]
        say(f"  FAILED {method.name} round {trial.round}: {problems[0]}")
        return Round(trial.round, None, False, problems)
    try:
        problems = compare(expected, shape(trial.cluster, timed.target))
    finally:
        timed.cleanup()
    if problems:
        say(f"  FAILED {method.name} round {trial.round} in {timed.seconds:.2f} s, but the copy is wrong:")
        for line in problems:
            say(f"    {line}")
    else:
        say(f"  {method.name:<15} round {trial.round}: {timed.seconds:8.2f} s, verified")
    return Round(trial.round, round(timed.seconds, 3), not problems, problems, timed.extra)


def run_bench(
    cluster: Cluster,
    plan: Plan,
    scratch: Path,
    *,
    say: Callable[[str], None] = print,
    run_id: str | None = None,
) -> tuple[list[Result], list[Source]]:
    """Run `plan`; every (dataset, method)'s rounds, and the sources used. The baselines'
    targets are named capybench_t_<run_id>_<n> (run_id random unless given)."""
    results: list[Result] = []
    sources: list[Source] = []
    run_id = run_id or secrets.token_hex(3)
    for dataset in plan.datasets:
        source = ensure_source(cluster, dataset, plan.scale, rebuild=plan.rebuild, say=say)
        sources.append(source)
        say(f"{dataset} at scale {plan.scale:g}: {source.database}, {source.size_bytes / 1024**2:.0f} MB")
        expected = shape(cluster, source.database)
        dump_file = None
        if any(m.mode == UPLOAD for m in plan.methods):
            dump_file = scratch / f"{source.database}.dump"
            run(["pg_dump", "-Fc", "-f", str(dump_file), "-d", cluster.url(source.database)])
        by_method = {m.name: Result(dataset, plan.scale, m.mode, m.name, m.label) for m in plan.methods}
        results.extend(by_method.values())
        for index in range(plan.rounds_of(dataset)):
            for number, method in enumerate(rotated(plan.methods, index)):
                folder = scratch / f"{dataset}-{method.name}-{index + 1}"
                folder.mkdir(parents=True)
                trial = Trial(
                    cluster=cluster,
                    source=source.database,
                    dump_file=dump_file,
                    scratch=folder,
                    target=f"capybench_t_{run_id}_{number}",
                    round=index + 1,
                )
                try:
                    by_method[method.name].rounds.append(run_once(method, trial, expected, say))
                finally:
                    # Also after an interruption (Ctrl+C) in the middle of a copy.
                    cluster.drop(trial.target)
                    shutil.rmtree(folder, ignore_errors=True)
        if dump_file is not None:
            dump_file.unlink(missing_ok=True)
    return results, sources
