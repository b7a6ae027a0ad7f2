"""Per-case circuit columns of two `bench run` folders side by side, and whether the editors differ.

For every numeric `circuit_*` field: each run's mean with its 95% percentile-bootstrap interval (the same
machinery as the run summaries, bench.results.bootstrap_interval), and the mean difference A − B over the
cases both runs scored (paired by case_id, the same facts), with its paired bootstrap interval. A column
"differs measurably" when that interval excludes 0 and at least 5 pairs have the column.

    python benchmarks/circuit_editors.py RUN_A RUN_B [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import bootstrap_interval, read_cases  # noqa: E402


MIN_PAIRS = 5  # below this the percentile bootstrap of a mean is too coarse to call a difference


def numeric(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def circuit_columns(cases: list[dict[str, Any]]) -> list[str]:
    return sorted({k for c in cases for k, v in c.items() if k.startswith("circuit_") and numeric(v) is not None})


def column_summary(cases: list[dict[str, Any]], column: str) -> dict[str, Any]:
    values = [v for v in (numeric(c.get(column)) for c in cases) if v is not None]
    interval = bootstrap_interval([values], np.mean) if values else None
    return {"n": len(values), "mean": float(np.mean(values)) if values else None,
            "ci": list(interval) if interval else None}


def paired_difference(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], column: str) -> dict[str, Any]:
    pairs = [(numeric(a[k].get(column)), numeric(b[k].get(column))) for k in sorted(a.keys() & b.keys())]
    diffs = [x - y for x, y in pairs if x is not None and y is not None]
    interval = bootstrap_interval([diffs], np.mean) if diffs else None
    return {"n": len(diffs), "mean": float(np.mean(diffs)) if diffs else None,
            "ci": list(interval) if interval else None,
            "differs": bool(len(diffs) >= MIN_PAIRS and interval and (interval[0] > 0 or interval[1] < 0))}


def ok_cases(run: Path) -> dict[str, dict[str, Any]]:
    return {c["case_id"]: c for c in read_cases(run / "cases.jsonl") if c.get("status") == "ok"}


def fmt(summary: dict[str, Any]) -> str:
    if summary["mean"] is None:
        return "—"
    ci = summary["ci"]
    return f"{summary['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{summary['mean']:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    a, b = ok_cases(Path(args.run_a)), ok_cases(Path(args.run_b))
    columns = sorted(set(circuit_columns(list(a.values()))) | set(circuit_columns(list(b.values()))))
    table = {col: {"a": column_summary(list(a.values()), col), "b": column_summary(list(b.values()), col),
                   "a_minus_b": paired_difference(a, b, col)} for col in columns}
    print(f"A = {args.run_a} ({len(a)} cases)\nB = {args.run_b} ({len(b)} cases)\n")
    print("| column | A mean [95% CI] (n) | B mean [95% CI] (n) | A − B paired [95% CI] (n) | differs |")
    print("|---|---|---|---|---|")
    for col, row in table.items():
        d = row["a_minus_b"]
        print(f"| `{col}` | {fmt(row['a'])} ({row['a']['n']}) | {fmt(row['b'])} ({row['b']['n']}) | "
              f"{fmt(d)} ({d['n']}) | {'yes' if d['differs'] else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": args.run_a, "b": args.run_b, "columns": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
