"""`python -m bench check`: the regression gate for editors (see bench/check.py).

Exit status: 0 when every editor meets its baseline, 1 on any failure line, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.check import (DEFAULT_BASELINE, DEFAULT_SUITE, build_baseline, compare, incomplete_runs, load_baseline,
                         load_suite, report_lines, roster, roster_failures, run_suite, write_slice)

NAME = "check"
HELP = "regression gate: run the fixed suite for every editor and compare with the baseline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=None, help="suite YAML (default leaderboard/suite.yaml)")
    parser.add_argument("--baseline", default=None, help="baseline JSON (default leaderboard/baseline.json)")
    parser.add_argument("--update-baseline", action="store_true",
                        help="rewrite the baseline from this run (for a deliberate change)")
    parser.add_argument("--editors", default=None,
                        help="comma-separated subset of the suite's editors to run and compare")
    parser.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")


def _selected(names: str | None, covered: list[str]) -> list[str]:
    if not names:
        return covered
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in covered]
    if unknown or not chosen:
        raise ValueError(f"--editors: unknown {unknown or names!r}; the suite covers: {', '.join(covered)}")
    return chosen


def main(args: argparse.Namespace) -> int:
    from editors.base import registry

    suite = load_suite(Path(args.suite) if args.suite else DEFAULT_SUITE)
    baseline_path = Path(args.baseline) if args.baseline else DEFAULT_BASELINE
    baseline = load_baseline(baseline_path)
    registered = list(registry())
    covered = roster(suite, registered)
    editors = _selected(args.editors, covered)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kebench-check-") as scratch:
        runs_dir = Path(args.runs_dir) if args.runs_dir else Path(scratch) / "runs"
        runs_dir.mkdir(parents=True, exist_ok=True)
        dataset_file, dataset_sha = write_slice(suite, Path(scratch))
        print(f"check: {len(editors)} editors × {len(suite.cases)} cases of {suite.dataset} on {suite.model} "
              f"({suite.device}, seed {suite.seed}, circuits {'on' if suite.circuits else 'off'})", flush=True)
        summaries, errors = run_suite(suite, editors, dataset_file, runs_dir)
    minutes = (time.perf_counter() - started) / 60
    if args.update_baseline:
        keep = set(covered) - set(editors)  # a subset update keeps the other editors' entries
        new = build_baseline(suite, summaries, dataset_sha, baseline, keep)
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        baseline_path.write_text(json.dumps(new, indent=2) + "\n")
        print(f"wrote {baseline_path}: {len(new['editors'])} editors ({minutes:.1f} min)")
        failures = compare({}, summaries, errors) + incomplete_runs(suite, summaries)
    else:
        print("\n".join(report_lines(baseline, summaries)))
        failures = roster_failures(editors, baseline, registered, baseline_path) + compare(baseline, summaries, errors)
    for failure in failures:
        print(failure.line())
    print(f"check: {'FAILED' if failures else 'passed'}, {len(failures)} failures, {minutes:.1f} min")
    return 1 if failures else 0
