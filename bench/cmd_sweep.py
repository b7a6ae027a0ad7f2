"""`python -m bench sweep SUITE.yaml`: the suite's runs, each sharded by batch across Ray workers (bench/sweep.py).

Exit status: 0 when every run is complete, 1 when one failed, 2 on bad input or a Ray that does not start,
130/143 when interrupted (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "sweep"
HELP = "run a suite (editors x models x datasets x seeds x hparams) sharded across Ray workers; resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="suite YAML: editors, models, datasets, seeds, hparams, run settings")
    parser.add_argument("--output", default=None, help="folder for the run folders (default: the suite's output, "
                                                       "else runs/)")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers per run (default: one per CPU, or per GPU times --workers-per-gpu)")
    parser.add_argument("--workers-per-gpu", type=int, default=1,
                        help="workers packed on one GPU, each reserving 1/k of it (default 1)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="CPU threads (and Ray CPUs) per worker (default 1)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start Ray locally")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds a local Ray start may take, retried within them (default 300)")


def main(args: argparse.Namespace) -> int:
    from bench.leaderboard import render
    from bench.sweep import SweepOptions, sweep

    options = SweepOptions(workers=args.workers, workers_per_gpu=args.workers_per_gpu,
                           threads_per_worker=args.threads_per_worker, address=args.address,
                           start_timeout_s=args.start_timeout)
    results = sweep(Path(args.suite), options, args.output)
    summaries = [summary for _, summary in results if not summary.get("skipped")]
    for run_dir, summary in results:
        print(f"results: {run_dir}{' (already complete)' if summary.get('skipped') else ''}")
    failed = [(d, s) for d, s in results if s.get("status") == "failed"]
    for run_dir, summary in failed:
        print(f"error: run failed: {summary.get('error')} (run folder {run_dir})", file=sys.stderr)
    if summaries:
        print(render(summaries))
    interrupted = [s for _, s in results if s.get("status") == "interrupted"]
    if interrupted:
        signal_name = interrupted[0].get("signal", "SIGINT")
        print(f"interrupted by {signal_name}; continue with: python -m bench sweep {args.suite}"
              + (f" --output {args.output}" if args.output else ""), file=sys.stderr)
        return 143 if signal_name == "SIGTERM" else 130
    return 1 if failed else 0
