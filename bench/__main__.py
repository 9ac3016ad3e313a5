"""`python -m bench`: the copy benchmark (see bench/README.md).

    python -m bench --datasets mix,tiny --scale 0.3 --rounds 3 [--methods ...] [--live] [--upload]
    python -m bench --rounds 2,many=5,tiny=5    # more rounds of the datasets that take seconds

Exits 0 when every round of every method verified, 1 when any failed, 2 on bad options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.datasets import DATASETS
from bench.methods import BASELINES, LIVE, UPLOAD, Method
from bench.pg import DEFAULT_ADMIN_URL, Cluster
from bench.report import failures, table, to_json, write_json
from bench.runner import DEFAULT_ROUNDS, Plan, Rounds, run_bench

SERVICE_METHODS = ("service", "service-upload")
MODES = {m.name: m.mode for m in BASELINES} | {"service": LIVE, "service-upload": UPLOAD}
# The table's order: each mode's baselines, then the service of that mode.
ALL_METHODS = (
    *(m.name for m in BASELINES if m.mode == LIVE),
    "service",
    *(m.name for m in BASELINES if m.mode == UPLOAD),
    "service-upload",
)
RESULTS = Path(__file__).resolve().parent / "results"


def _names(raw: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}: choose from {', '.join(allowed)}"
        )
    return names


def _rounds(raw: str) -> Rounds:
    """`--rounds`: "N" for every dataset, or "N,dataset=M,…" for some datasets M rounds."""
    default, overrides = None, {}
    for part in (p.strip() for p in raw.split(",")):
        name, equals, count = part.rpartition("=")
        name, count = name.strip(), count.strip()
        if not (count.isascii() and count.isdigit()) or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: a round count is a whole number, 1 or more")
        if not equals:
            if default is not None:
                raise argparse.ArgumentTypeError(f"{raw!r} gives the rounds of every dataset twice")
            default = int(count)
        elif name not in DATASETS:
            raise argparse.ArgumentTypeError(
                f"unknown dataset {name!r} in --rounds: choose from {', '.join(DATASETS)}"
            )
        elif name in overrides:
            raise argparse.ArgumentTypeError(f"{raw!r} gives the rounds of {name} twice")
        else:
            overrides[name] = int(count)
    return Rounds(DEFAULT_ROUNDS if default is None else default, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Time the service against pg_dump, pg_restore and pgcopydb."
    )
    parser.add_argument(
        "--datasets",
        type=lambda s: _names(s, DATASETS, "dataset"),
        default=list(DATASETS),
        help=f"comma-separated, of {', '.join(DATASETS)} (default: all)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="row counts relative to scale 1 (default 1; mix is about 1.6 GB there)",
    )
    parser.add_argument(
        "--rounds",
        type=_rounds,
        default=Rounds(DEFAULT_ROUNDS),
        help=f"rounds per method, the median quoted: N, or N,DATASET=M,… to give some datasets M "
        f"(default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--methods",
        type=lambda s: _names(s, ALL_METHODS, "method"),
        default=None,
        help=f"comma-separated, of {', '.join(ALL_METHODS)} (default: all of the chosen modes)",
    )
    parser.add_argument(
        "--live", action="store_true", help="only the methods that copy from the source database"
    )
    parser.add_argument(
        "--upload", action="store_true", help="only the methods that restore a -Fc file of it"
    )
    parser.add_argument("--rebuild", action="store_true", help="build the sources again even if they exist")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("CAPY_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a superuser URL of the cluster to use (default: $CAPY_BENCH_ADMIN_URL or %(default)s)",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)"
    )
    return parser  # fmt: skip


def chosen_methods(args: argparse.Namespace) -> list[str]:
    """The method names to run, in the order of ALL_METHODS."""
    modes = {m for m, flag in ((LIVE, args.live), (UPLOAD, args.upload)) if flag} or {LIVE, UPLOAD}
    wanted = args.methods or list(ALL_METHODS)
    return [name for name in ALL_METHODS if name in wanted and MODES[name] in modes]


def _version(argv: list[str]) -> str:
    try:
        return (
            subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
        )
    except (OSError, IndexError, subprocess.SubprocessError):
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scale <= 0:
        print(f"--scale must be above 0, not {args.scale:g}", file=sys.stderr)
        return 2
    names = chosen_methods(args)
    if not names:
        print("no method left: --methods and --live/--upload exclude each other", file=sys.stderr)
        return 2
    if "pgcopydb" in names and shutil.which("pgcopydb") is None:
        print(
            "pgcopydb is not installed: as root, `apt-get install pgcopydb` (Debian), "
            "or leave it out with --methods",
            file=sys.stderr,
        )
        return 2
    cluster = Cluster(args.admin_url)
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="capybench-")))
        methods: list[Method] = [m for m in BASELINES if m.name in names]
        if any(name in SERVICE_METHODS for name in names):
            from bench.service import ServiceLive, ServiceUpload, running_service

            print("starting the service (gunicorn, a dramatiq worker, SeaweedFS; CAPY_CONCURRENCY=2)")
            bench = stack.enter_context(running_service(cluster, scratch / "service"))
            methods += [m for m in (ServiceLive(bench), ServiceUpload(bench)) if m.name in names]
        methods.sort(key=lambda m: ALL_METHODS.index(m.name))
        plan = Plan(args.datasets, args.scale, args.rounds, methods, rebuild=args.rebuild)
        results, sources = run_bench(cluster, plan, scratch)
    finished = dt.datetime.now(dt.UTC)
    meta = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - clock, 1),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scale": args.scale,
        "rounds": args.rounds.default,
        "rounds_by_dataset": {d: args.rounds.of(d) for d in args.datasets},
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "postgres": cluster.server_version(),
            "pg_dump": _version(["pg_dump", "--version"]),
            "pgcopydb": _version(["pgcopydb", "--version"]) if shutil.which("pgcopydb") else "not installed",
        },
        "sources": [
            {"dataset": s.dataset, "database": s.database, "size_mb": round(s.size_bytes / 1024**2, 1)}
            for s in sources
        ],
    }
    path = write_json(to_json(results, meta), args.results, started.strftime("%Y%m%dT%H%M%SZ"))
    print()
    print(table(results))
    print(f"\n{meta['wall_s']} s in all; JSON in {path}")
    problems = failures(results)
    if problems:
        print("\nFAILED: these copies did not verify, their times do not count:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
