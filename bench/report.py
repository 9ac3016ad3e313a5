"""Results: rounds per (dataset, method), medians, the service's ratios, the table, the JSON.

A method's median is taken over its verified rounds only, and a method with any failed
round is reported FAILED (its median is shown but no ratio is drawn from it): a copy
that is fast and wrong is not a result. Ratios are service / baseline within one mode:
below 1.0 the service is faster.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SERVICE_METHODS = {"live": "service", "upload": "service-upload"}


@dataclass
class Round:
    round: int
    seconds: float | None  # None when the copy itself failed
    ok: bool
    problems: list[str] = field(default_factory=list)  # why it failed; [] when ok
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """Every round of one method on one dataset."""

    dataset: str
    scale: float
    mode: str
    method: str
    label: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(not r.ok for r in self.rounds)

    @property
    def median(self) -> float | None:
        times = [r.seconds for r in self.rounds if r.ok and r.seconds is not None]
        return statistics.median(times) if times else None

    @property
    def median_polled(self) -> float | None:
        """The service's median to the poll that saw the job `completed` (bench.service):
        the headline median plus the bench's own polling lag. None for the baselines."""
        times = [r.extra["polled_s"] for r in self.rounds if r.ok and "polled_s" in r.extra]
        return statistics.median(times) if times else None

    def peak(self, key: str) -> float | None:
        values = [r.extra[key] for r in self.rounds if key in r.extra]
        return max(values) if values else None


def ratios(results: list[Result]) -> dict[tuple[str, str, str], float]:
    """(dataset, mode, baseline) -> service median / baseline median, for every pair that
    both verified in every round."""
    out: dict[tuple[str, str, str], float] = {}
    for service in results:
        if service.method != SERVICE_METHODS.get(service.mode) or service.failed or service.median is None:
            continue
        for base in results:
            if (base.dataset, base.mode) != (service.dataset, service.mode) or base is service:
                continue
            if base.failed or not base.median:
                continue
            out[(service.dataset, service.mode, base.method)] = service.median / base.median
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cell(text: str) -> str:
    """`text` in a Markdown table cell: a pipe would end the cell."""
    return text.replace("|", "\\|")


def _mb(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def table(results: list[Result]) -> str:
    """The results as a Markdown table (it reads as plain text too), one row per method."""
    quotients = ratios(results)
    header = (
        "| dataset | scale | mode | method | median s | rounds ok | service / this "
        "| worker RSS MB | worker+children RSS MB | work dir MB |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        ok = sum(1 for x in r.rounds if x.ok)
        status = f"{ok}/{len(r.rounds)}" + (" **FAILED**" if r.failed else "")
        if r.method == SERVICE_METHODS.get(r.mode):
            ratio = "-" if r.failed or r.median is None else "1.00"
        else:
            quotient = quotients.get((r.dataset, r.mode, r.method))
            ratio = "-" if quotient is None else f"{quotient:.2f}"
        lines.append(
            f"| {r.dataset} | {r.scale:g} | {r.mode} | {_cell(r.label)} | {_seconds(r.median)} | {status} | {ratio} "
            f"| {_mb(r.peak('worker_rss_peak_mb'))} | {_mb(r.peak('worker_tree_rss_peak_mb'))} "
            f"| {_mb(r.peak('work_dir_peak_mb'))} |"
        )
    return "\n".join(lines)


def failures(results: list[Result]) -> list[str]:
    """One line per failed round: dataset, method, round and why."""
    return [
        f"{r.dataset} {r.method} round {x.round}: " + "; ".join(x.problems)
        for r in results
        for x in r.rounds
        if not x.ok
    ]


def to_json(results: list[Result], meta: dict[str, Any]) -> dict[str, Any]:
    quotients = ratios(results)
    return {
        **meta,
        "results": [
            {
                **{k: v for k, v in asdict(r).items() if k != "rounds"},
                "median_s": r.median,
                **({"median_polled_s": r.median_polled} if r.median_polled is not None else {}),
                "failed": r.failed,
                "peaks": {
                    key: r.peak(key)
                    for key in ("worker_rss_peak_mb", "worker_tree_rss_peak_mb", "work_dir_peak_mb")
                },
                "rounds": [asdict(x) for x in r.rounds],
            }
            for r in results
        ],
        "ratios": [
            {"dataset": d, "mode": m, "baseline": b, "service_over_baseline": round(q, 3)}
            for (d, m, b), q in sorted(quotients.items())
        ],
    }


def write_json(document: dict[str, Any], folder: Path, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}.json"
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
