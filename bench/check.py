"""The regression gate: a fixed suite of `bench run`s compared with a committed baseline.

The suite (`leaderboard/suite.yaml`) fixes the model, the dataset and the exact case ids, the seed, the
device, whether circuits run, extra RunConfig options, per-editor hyperparameter overrides, and the gated
metrics with a minimum tolerance each. Every registered editor (or the suite's explicit list) runs once
through `bench.run.run` on that slice, with the known-fact filter off so every listed case is edited.

The baseline (`leaderboard/baseline.json`) stores, per editor and gated metric, the mean, its 95%
bootstrap interval over the slice's cases, n, the direction, and the tolerance. The tolerance follows
from the interval: the half-width on the regression side (mean − low for higher-is-better metrics,
high − mean for lower-is-better ones) times `tolerance_scale`, and never below the metric's
`min_tolerance` (a zero-width interval from constant values, e.g. ES = 1 on every case, would otherwise
allow no float noise at all). This is a statement about case-to-case spread, not about the run-to-run
noise of one deterministic CPU run, so it is lenient for rates on a tiny slice; the continuous metrics
(magnitudes, ln P(new) lift, drift) are the ones that catch a weakened edit.

The gate fails when a metric regresses past its tolerance or disappears, when an editor edits fewer
cases than in the baseline (its run failed on some), when its run raises, when an editor is registered
but missing from the baseline, and when a baseline editor is no longer registered.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data import load_dataset
from bench.results import METRICS, git_commit, now
from lmview.io import read_mapping, read_yaml_mapping
from lmview.paths import REPO_ROOT

log = logging.getLogger("bench")

DEFAULT_SUITE = REPO_ROOT / "leaderboard" / "suite.yaml"
DEFAULT_BASELINE = REPO_ROOT / "leaderboard" / "baseline.json"
# RunConfig fields the suite sets itself; the others may be given under `run:`
SUITE_OWNED = {"editor", "model", "dataset", "n", "seed", "device", "output", "hparams", "circuits", "only_known"}
TOLERANCE_RULE = ("tolerance = max(min_tolerance, tolerance_scale × the 95% interval's half-width on the "
                  "regression side)")


@dataclass
class Suite:
    path: Path
    model: str
    dataset: str
    cases: list[str]
    metrics: dict[str, float]  # gated metric -> min tolerance
    seed: int = 0
    device: str = "cpu"
    circuits: bool = False
    editors: list[str] | None = None  # None: every registered editor
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of registered editors left out
    hparams: dict[str, str] = field(default_factory=dict)  # editor -> YAML file
    run_options: dict[str, Any] = field(default_factory=dict)
    tolerance_scale: float = 1.0

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "model": self.model, "dataset": self.dataset, "cases": self.cases,
                "seed": self.seed, "device": self.device, "circuits": self.circuits, "run": self.run_options}


@dataclass
class Failure:
    editor: str
    what: str

    def line(self) -> str:
        return f"FAIL {self.editor}: {self.what}"


# --- the suite ------------------------------------------------------------------------------

def load_suite(path: Path) -> Suite:
    if not path.is_file():
        raise ValueError(f"suite file '{path}' does not exist")
    raw = read_yaml_mapping(path)
    for key in ("model", "dataset", "cases", "metrics"):
        if key not in raw:
            raise ValueError(f"{path}: missing field '{key}'")
    cases = raw["cases"]
    if not isinstance(cases, list) or not cases or not all(isinstance(c, str) for c in cases):
        raise ValueError(f"{path}: 'cases' must be a non-empty list of case ids")
    editors = raw.get("editors", "all")
    if editors != "all" and not (isinstance(editors, list) and all(isinstance(e, str) for e in editors)):
        raise ValueError(f"{path}: 'editors' must be 'all' or a list of editor names")
    exclude = raw.get("exclude") or []
    if not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
        raise ValueError(f"{path}: 'exclude' must be a list of editor-name patterns")
    if not isinstance(raw.get("hparams") or {}, dict):
        raise ValueError(f"{path}: 'hparams' must map editor names to YAML files")
    hparams = {name: str((path.parent / file).resolve()) for name, file in (raw.get("hparams") or {}).items()}
    return Suite(path=path, model=str(raw["model"]), dataset=str(raw["dataset"]), cases=cases,
                 metrics=_metric_tolerances(path, raw["metrics"]), seed=int(raw.get("seed", 0)),
                 device=str(raw.get("device", "cpu")), circuits=bool(raw.get("circuits", False)),
                 editors=None if editors == "all" else editors, exclude=exclude, hparams=hparams,
                 run_options=_run_options(path, raw.get("run") or {}),
                 tolerance_scale=float(raw.get("tolerance_scale", 1.0)))


def _metric_tolerances(path: Path, metrics: Any) -> dict[str, float]:
    """`metrics:` maps each gated metric to {min_tolerance: x} (or directly to x)."""
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{path}: 'metrics' must map metric names to {{min_tolerance: x}}")
    known = {m.name for m in METRICS} | {"score"}
    out = {}
    for name, spec in metrics.items():
        if name not in known:
            raise ValueError(f"{path}: unknown metric '{name}'; valid: {', '.join(sorted(known))}")
        value = spec.get("min_tolerance") if isinstance(spec, dict) else spec
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{path}: metric '{name}' needs a non-negative min_tolerance")
        out[name] = float(value)
    return out


def _run_options(path: Path, options: Any) -> dict[str, Any]:
    from bench.run import RunConfig

    allowed = {f.name for f in dataclasses.fields(RunConfig)} - SUITE_OWNED
    if not isinstance(options, dict) or set(options) - allowed:
        bad = sorted(set(options) - allowed) if isinstance(options, dict) else options
        raise ValueError(f"{path}: unknown run options {bad}; allowed: {', '.join(sorted(allowed))}")
    return dict(options)


def roster(suite: Suite, registered: list[str]) -> list[str]:
    """The editors the suite covers: its explicit list, else every registered editor not excluded."""
    if suite.editors is None:
        return [e for e in registered if not any(fnmatch.fnmatchcase(e, pat) for pat in suite.exclude)]
    unknown = [e for e in suite.editors if e not in registered]
    if unknown:
        raise ValueError(f"{suite.path}: unknown editors {unknown}; registered: {', '.join(registered)}")
    return list(suite.editors)


def write_slice(suite: Suite, folder: Path) -> tuple[Path, str]:
    """The suite's cases, in the built-in facts layout, as one file; returns it and the source's sha256."""
    data = load_dataset(suite.dataset)
    by_id = {case.case_id: case for case in data.cases}
    missing = [cid for cid in suite.cases if cid not in by_id]
    if missing:
        raise ValueError(f"{suite.path}: case ids not in dataset '{suite.dataset}': {', '.join(missing)}")
    path = folder / f"{data.name}-check.json"
    path.write_text(json.dumps({"name": f"{data.name}-check", "source_sha256": data.sha256,
                                "cases": [by_id[cid].to_dict() for cid in suite.cases]}, indent=1))
    return path, data.sha256


# --- running ---------------------------------------------------------------------------------

def run_editor(suite: Suite, editor: str, dataset_file: Path, runs_dir: Path) -> dict[str, Any]:
    """One `bench run` of the suite for this editor; returns its summary."""
    from bench.run import RunConfig, run

    cfg = RunConfig(editor=editor, model=suite.model, dataset=str(dataset_file), n=None, seed=suite.seed,
                    device=suite.device, output=str(runs_dir), hparams=suite.hparams.get(editor),
                    circuits=suite.circuits, only_known=False, **suite.run_options)
    _, summary = run(cfg)
    if summary.get("status") == "interrupted":
        raise KeyboardInterrupt
    if summary.get("status") == "failed":  # systematic failures, or a model left changed after a restore
        raise RuntimeError(summary.get("error") or "the run failed")
    return summary


def run_suite(suite: Suite, editors: list[str], dataset_file: Path, runs_dir: Path
              ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Summaries of the editors whose run finished, and the error of each whose run raised."""
    summaries, errors = {}, {}
    for editor in editors:
        start = time.perf_counter()
        try:
            summaries[editor] = run_editor(suite, editor, dataset_file, runs_dir)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a broken editor fails the gate; the other editors still run
            errors[editor] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log.info("check: %s done in %.0f s", editor, time.perf_counter() - start)
    return summaries, errors


# --- baseline ---------------------------------------------------------------------------------

def tolerance(aggregate: dict[str, Any], min_tolerance: float, scale: float) -> float:
    mean, low, high = aggregate["mean"], aggregate.get("ci_low"), aggregate.get("ci_high")
    if aggregate.get("higher_is_better") is False:
        half = high - mean if high is not None else 0.0
    else:
        half = mean - low if low is not None else 0.0
    return max(min_tolerance, scale * max(half, 0.0))


def baseline_entry(suite: Suite, summary: dict[str, Any]) -> dict[str, Any]:
    metrics = {}
    for name, min_tol in suite.metrics.items():
        agg = (summary.get("metrics") or {}).get(name)
        if agg is None or agg.get("mean") is None or agg.get("higher_is_better") is None:
            continue
        metrics[name] = {"value": agg["mean"], "ci": [agg.get("ci_low"), agg.get("ci_high")], "n": agg["n"],
                         "higher_is_better": agg["higher_is_better"],
                         "tolerance": tolerance(agg, min_tol, suite.tolerance_scale)}
    return {"n_cases": summary.get("n_cases", 0), "metrics": metrics}


def build_baseline(suite: Suite, summaries: dict[str, dict[str, Any]], dataset_sha256: str,
                   previous: dict[str, Any] | None, keep: set[str]) -> dict[str, Any]:
    """A new baseline: the fresh editors' entries plus the previous entries of the editors in `keep`."""
    editors = {name: entry for name, entry in ((previous or {}).get("editors") or {}).items() if name in keep}
    editors.update({name: baseline_entry(suite, summary) for name, summary in summaries.items()})
    return {"suite": dict(suite.describe(), dataset_sha256=dataset_sha256), "generated": now(),
            "commit": git_commit(), "command": "python -m bench check --update-baseline",
            "tolerance_rule": TOLERANCE_RULE, "editors": dict(sorted(editors.items()))}


def load_baseline(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"editors": {}}
    no_editors = f"baseline '{path}' has no 'editors' mapping"
    data = read_mapping(path, lambda reason: ValueError(f"baseline '{path}' is not valid JSON: {reason}"),
                        lambda _: ValueError(no_editors))
    if not isinstance(data.get("editors"), dict):
        raise ValueError(no_editors)
    return data


# --- comparison -------------------------------------------------------------------------------

def roster_failures(expected: list[str], baseline: dict[str, Any], registered: list[str], baseline_path: Path
                    ) -> list[Failure]:
    in_baseline = set(baseline.get("editors") or {})
    failures = [Failure(e, f"registered but missing from the baseline {baseline_path} "
                           "(run `python -m bench check --update-baseline`)") for e in expected if e not in in_baseline]
    failures += [Failure(e, f"in the baseline {baseline_path} but no longer registered")
                 for e in sorted(in_baseline) if e not in registered]
    return failures


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def metric_failures(editor: str, entry: dict[str, Any], summary: dict[str, Any]) -> list[Failure]:
    failures = []
    n_now, n_base = summary.get("n_cases", 0), entry.get("n_cases", 0)
    if n_now < n_base:
        failures.append(Failure(editor, f"n_cases = {n_now}, below baseline {n_base} (tolerance 0; "
                                        f"{summary.get('n_failed', 0)} cases failed)"))
    metrics = summary.get("metrics") or {}
    for name, base in entry.get("metrics", {}).items():
        value = (metrics.get(name) or {}).get("mean")
        if value is None:
            failures.append(Failure(editor, f"{name} = none, baseline {_fmt(base['value'])} "
                                            f"(tolerance {_fmt(base['tolerance'])}): the metric is missing"))
        elif base["higher_is_better"] and value < base["value"] - base["tolerance"]:
            failures.append(Failure(editor, f"{name} = {_fmt(value)}, below baseline {_fmt(base['value'])} "
                                            f"by more than the tolerance {_fmt(base['tolerance'])}"))
        elif not base["higher_is_better"] and value > base["value"] + base["tolerance"]:
            failures.append(Failure(editor, f"{name} = {_fmt(value)}, above baseline {_fmt(base['value'])} "
                                            f"by more than the tolerance {_fmt(base['tolerance'])} "
                                            "(lower is better)"))
    return failures


def incomplete_runs(suite: Suite, summaries: dict[str, dict[str, Any]]) -> list[Failure]:
    """For --update-baseline: editors that did not finish every case of the suite."""
    return [Failure(editor, f"n_cases = {summary.get('n_cases', 0)} of {len(suite.cases)}: "
                            f"{summary.get('n_failed', 0)} cases failed (see the run's cases.jsonl)")
            for editor, summary in summaries.items() if summary.get("n_cases", 0) < len(suite.cases)]


def compare(baseline: dict[str, Any], summaries: dict[str, dict[str, Any]], errors: dict[str, str]
            ) -> list[Failure]:
    failures = [Failure(editor, f"run failed: {message}") for editor, message in errors.items()]
    entries = baseline.get("editors") or {}
    for editor, summary in summaries.items():
        if editor in entries:
            failures += metric_failures(editor, entries[editor], summary)
    return failures


def report_lines(baseline: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
    """One line per editor and gated metric: value, baseline and tolerance."""
    lines = []
    for editor, summary in summaries.items():
        entry = (baseline.get("editors") or {}).get(editor)
        if not entry:
            continue
        for name, base in entry["metrics"].items():
            value = ((summary.get("metrics") or {}).get(name) or {}).get("mean")
            lines.append(f"  {editor:14s} {name:24s} value {_fmt(value):>10s}  baseline {_fmt(base['value']):>10s}"
                         f"  tolerance {_fmt(base['tolerance'])}")
    return lines
