"""Peak memory of the service's workers and peak local disk, sampled while an import runs.

Read straight from /proc (Linux), every `interval` seconds, in a thread:

- `worker_rss_peak`: the largest resident set of one dramatiq worker process (a child of
  a dramatiq master): the number issue 11's "worker RSS under 300 MB" is about;
- `tree_rss_peak`: the largest sum of proportional set sizes (PSS) of the worker
  processes and every process under them (pg_dump, pg_restore, psql…): what the worker
  host must hold. PSS divides a page shared by several processes among them; a sum of
  resident sets counted a child between fork and exec, whose pages are still the
  worker's, a second time (a `mix` round once showed 340 MB for a worker of 173 MB);
- `disk_peak`: the largest number of bytes allocated under CAPY_WORK_DIR.

Peaks of samples can miss a spike shorter than the interval; 0.2 s is well below the
length of any copy worth measuring.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def parent_map(proc: Path = Path("/proc")) -> dict[int, int]:
    """pid -> parent pid of every process now running."""
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(parents: Mapping[int, int], roots: Iterable[int]) -> set[int]:
    """Every process below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """Resident set size of `pid`, 0 if it is gone."""
    try:
        return int((proc / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """Proportional set size of `pid` (its private pages, and its share of each page it
    shares with others), from smaps_rollup; its resident set size where the kernel has
    no smaps_rollup (before Linux 4.14); 0 if it is gone."""
    try:
        with open(proc / str(pid) / "smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024  # kB
        return 0  # an exiting process has no mappings left
    except FileNotFoundError:
        return rss_bytes(pid, proc) if (proc / str(pid)).exists() else 0
    except (OSError, IndexError, ValueError):
        return 0


def disk_bytes(folder: Path) -> int:
    """Bytes allocated to files under `folder` (as du counts them), 0 if it is gone."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue  # removed while we walked
    return total


@dataclass
class Peaks:
    worker_rss_peak: int = 0
    tree_rss_peak: int = 0
    disk_peak: int = 0
    samples: int = 0

    def as_dict(self) -> dict[str, float | int]:
        mb = 1024 * 1024
        return {
            "worker_rss_peak_mb": round(self.worker_rss_peak / mb, 1),
            "worker_tree_rss_peak_mb": round(self.tree_rss_peak / mb, 1),
            "work_dir_peak_mb": round(self.disk_peak / mb, 1),
            "samples": self.samples,
        }


class PeakSampler:
    """`with PeakSampler(masters, work_dir) as peaks:` samples until the block ends.

    `masters` are the pids of the dramatiq master processes; their children are the
    worker processes.
    """

    def __init__(self, masters: Iterable[int], work_dir: Path, interval: float = 0.2):
        self.masters, self.work_dir, self.interval = list(masters), work_dir, interval
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def sample(self) -> None:
        parents = parent_map()
        workers = {pid for pid, ppid in parents.items() if ppid in self.masters}
        tree = workers | descendants(parents, workers)
        peaks = self.peaks
        peaks.worker_rss_peak = max(peaks.worker_rss_peak, max(map(rss_bytes, workers), default=0))
        peaks.tree_rss_peak = max(peaks.tree_rss_peak, sum(map(pss_bytes, tree)))
        peaks.disk_peak = max(peaks.disk_peak, disk_bytes(self.work_dir))
        peaks.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self.peaks

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
