"""Run folders (manifest with provenance, append-only per-case JSONL) and the run summary.

The summary aggregates each metric over the run's finished cases: the point estimate is the mean, and
every aggregate carries its n and a 95% confidence interval from the percentile bootstrap over cases
(Efron & Tibshirani 1993, ch. 13; `scipy.stats.bootstrap`, 9,999 resamples, fixed seed, so a summary is
reproducible). Metrics are grouped in labelled families that are never averaged together:

* counterfact (Meng et al. 2022, from record["post"]): ES, PS, NS, the magnitudes, and S, their harmonic
  mean. S is a statistic of three means, so its interval resamples cases jointly (paired bootstrap).
  Also `log_p_new_lift`, ln P_post(new) − ln P_pre(new) on the rewrite prompt: a continuous companion of
  ES that the regression gate uses because a 0/1 rate on three facts is too coarse; and the generation
  entropy GE and reference score RS of record["post_generation"] (CounterFact's fluency and consistency);
* easyedit (record["post_easyedit"]): reliability, generalization, locality, portability;
* generation (record["post_generation"]): generation-based success, with no teacher forcing;
* drift: neighbourhood KL, and the perplexity change ppl_post − ppl_pre;
* circuit: every numeric `circuit_*` and `relation_*` field, and whether the edited layer is in the post-edit circuit;
* cost: seconds per edit and per circuit.

Degenerate samples: no values gives no estimate; one value gives the mean with no interval (ci null);
constant values give the zero-width interval [c, c], which is what every resample yields. Fields that a
record lacks are skipped, so each metric's n counts the cases that report it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.scoring import harmonic_mean

CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0

FAMILIES: dict[str, str] = {
    "counterfact": "CounterFact", "easyedit": "EasyEdit", "generation": "Generation", "drift": "Drift",
    "circuit": "Circuit", "cost": "Cost",
}


@dataclass(frozen=True)
class Metric:
    """One per-case quantity: its family, a short column title, how to read it from a case record, and
    which direction is an improvement (None: descriptive, never a regression)."""

    name: str
    family: str
    label: str
    read: Callable[[dict[str, Any]], Any]
    higher_is_better: bool | None = True


def _field(*path: str) -> Callable[[dict[str, Any]], Any]:
    def read(record: dict[str, Any]) -> Any:
        value: Any = record
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return read


def _log_p_new_lift(record: dict[str, Any]) -> float | None:
    pre, post = _number(_field("pre", "p_new")(record)), _number(_field("post", "p_new")(record))
    if pre is None or post is None or pre <= 0 or post <= 0:
        return None
    return math.log(post) - math.log(pre)


def _ppl_delta(record: dict[str, Any]) -> float | None:
    pre, post = _number(record.get("ppl_pre")), _number(record.get("ppl_post"))
    return None if pre is None or post is None else post - pre


METRICS: list[Metric] = [
    Metric("efficacy_score", "counterfact", "ES", _field("post", "efficacy_score")),
    Metric("paraphrase_score", "counterfact", "PS", _field("post", "paraphrase_score")),
    Metric("neighborhood_score", "counterfact", "NS", _field("post", "neighborhood_score")),
    Metric("efficacy_magnitude", "counterfact", "EM", _field("post", "efficacy_magnitude")),
    Metric("paraphrase_magnitude", "counterfact", "PM", _field("post", "paraphrase_magnitude")),
    Metric("neighborhood_magnitude", "counterfact", "NM", _field("post", "neighborhood_magnitude")),
    Metric("log_p_new_lift", "counterfact", "ln p lift", _log_p_new_lift),
    Metric("generation_entropy", "counterfact", "GE", _field("post_generation", "generation_entropy")),
    Metric("reference_score", "counterfact", "RS", _field("post_generation", "reference_score")),
    Metric("reliability", "easyedit", "Rel", _field("post_easyedit", "reliability")),
    Metric("generalization", "easyedit", "Gen", _field("post_easyedit", "generalization")),
    Metric("locality", "easyedit", "Loc", _field("post_easyedit", "locality")),
    Metric("portability", "easyedit", "Port", _field("post_easyedit", "portability")),
    Metric("generation_success", "generation", "GS", _field("post_generation", "generation_success")),
    Metric("drift_kl", "drift", "KL", _field("drift_kl"), higher_is_better=False),
    Metric("ppl_delta", "drift", "ΔPPL", _ppl_delta, higher_is_better=False),
    Metric("circuit_edge_jaccard", "circuit", "Edge J", _field("circuit_edge_jaccard"), None),
    Metric("circuit_node_jaccard", "circuit", "Node J", _field("circuit_node_jaccard"), None),
    Metric("circuit_faithfulness_pre", "circuit", "Faith pre", _field("circuit_faithfulness_pre"), None),
    Metric("circuit_faithfulness_post", "circuit", "Faith post", _field("circuit_faithfulness_post"), None),
    Metric("edit_layer_in_circuit", "circuit", "Layer in", _field("edit_layer_in_circuit"), None),
    Metric("seconds_per_edit", "cost", "s/edit", _field("seconds_edit"), None),
    Metric("seconds_per_circuit", "cost", "s/circuit", _field("seconds_circuit"), None),
]
SCORE = Metric("score", "counterfact", "S", lambda record: None)  # a statistic of three means, see _score
SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")

# summary keys kept for readers of older summaries (null when a run has no such values)
LEGACY_KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
               "paraphrase_magnitude", "neighborhood_magnitude", "drift_kl", "circuit_edge_jaccard",
               "circuit_node_jaccard", "circuit_faithfulness_pre", "circuit_faithfulness_post",
               "edit_layer_in_circuit", "seconds_per_edit", "seconds_per_circuit"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def library_versions() -> dict[str, str]:
    names = ["torch", "transformers", "transformer-lens", "gguf", "numpy", "scipy"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["python"] = platform.python_version()
    return found


class RunWriter:
    def __init__(self, run_dir: Path, manifest: dict[str, Any]):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=False)
        self.manifest = dict(manifest, started=now(), commit=git_commit(), versions=library_versions(),
                             host=platform.node())
        self.cases_path = self.dir / "cases.jsonl"
        self.cases_path.touch()
        self.write_manifest()

    def write_manifest(self) -> None:
        _atomic_json(self.dir / "manifest.json", self.manifest)

    def append(self, record: dict[str, Any]) -> None:
        """One line per case, flushed to disk before the next case starts."""
        with open(self.cases_path, "a") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, extra: dict[str, Any], status: str = "complete") -> dict[str, Any]:
        summary = summarize(read_cases(self.cases_path))
        summary.update(editor=self.manifest["editor"], model=self.manifest["model"]["name"],
                       dataset=self.manifest["dataset"]["name"], **extra)
        _atomic_json(self.dir / "summary.json", summary)
        self.manifest.update(finished=now(), status=status)
        self.write_manifest()
        return summary


def read_cases(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
    return rows


def _number(value: Any) -> float | None:
    """A finite float from a number, or the mean of a list or mapping of numbers (e.g. portability per
    prompt kind); None for anything else."""
    if isinstance(value, (bool, int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        parts = [_number(v) for v in value if not isinstance(v, (dict, list, tuple))]
        parts = [p for p in parts if p is not None]
        return sum(parts) / len(parts) if parts else None
    return None


def bootstrap_interval(samples: Sequence[Sequence[float]], statistic: Callable[..., Any],
                       level: float = CONFIDENCE_LEVEL, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of statistic(*samples, axis=-1), resampling cases (jointly when there
    are several samples, which must then be paired). None for fewer than two cases."""
    arrays = tuple(np.asarray(sample, dtype=float) for sample in samples)
    if len(arrays[0]) < 2:
        return None
    if all(np.ptp(a) == 0 for a in arrays):  # every resample equals the sample
        point = float(statistic(*arrays, axis=-1))
        return point, point
    from scipy import stats  # imported here: every CLI command imports this module

    result = stats.bootstrap(arrays, statistic, n_resamples=n_resamples, paired=len(arrays) > 1,
                             vectorized=True, axis=-1, confidence_level=level, method="percentile",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def harmonic_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """S = harmonic mean of the samples' means (0 when any mean is 0), vectorised over resamples."""
    means = np.stack([np.mean(s, axis=axis) for s in samples])
    with np.errstate(divide="ignore"):
        value = len(samples) / np.sum(1.0 / means, axis=0)
    return np.where(np.all(means > 0, axis=0), value, 0.0)


def _aggregate(metric: Metric, point: float | None, n: int, interval: tuple[float, float] | None
               ) -> dict[str, Any]:
    return {"family": metric.family, "label": metric.label, "mean": point, "n": n,
            "ci_low": interval[0] if interval else None, "ci_high": interval[1] if interval else None,
            "higher_is_better": metric.higher_is_better}


def _metric_of(metric: Metric, cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    values = [v for v in (_number(metric.read(c)) for c in cases) if v is not None]
    if not values:
        return None
    return _aggregate(metric, sum(values) / len(values), len(values), bootstrap_interval([values], np.mean))


def _score(cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """S over the cases that report all of ES, PS and NS, with a paired interval."""
    readers = {m.name: m.read for m in METRICS if m.name in SCORE_PARTS}
    rows = [[_number(readers[name](c)) for name in SCORE_PARTS] for c in cases]
    rows = [row for row in rows if all(v is not None for v in row)]
    if not rows:
        return None
    columns = [np.array(col) for col in zip(*rows)]
    point = harmonic_mean([float(col.mean()) for col in columns])
    return _aggregate(SCORE, point, len(rows), bootstrap_interval(columns, harmonic_of_means))


def _extra_circuit_metrics(cases: list[dict[str, Any]]) -> list[Metric]:
    """Numeric circuit_* and relation_* (--relation-circuits) fields beyond the known ones."""
    known = {m.name for m in METRICS}
    names = sorted({k for c in cases for k, v in c.items()
                    if k.startswith(("circuit_", "relation_")) and k not in known and _number(v) is not None
                    and not isinstance(v, (dict, list, tuple))})
    return [Metric(name, "circuit", name.removeprefix("circuit_").replace("_", " "), _field(name), None)
            for name in names]


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric mean, n and bootstrap interval over the finished cases, grouped by family; the means
    also appear as flat keys (`efficacy_score`, `score`, ...)."""
    done = [c for c in cases if c.get("status") == "ok"]
    out: dict[str, Any] = {"n_cases": len(done), "n_failed": sum(c.get("status") == "failed" for c in cases)}
    found: dict[str, dict[str, Any]] = {}
    for metric in METRICS + _extra_circuit_metrics(done):
        aggregate = _metric_of(metric, done)
        if aggregate is not None:
            found[metric.name] = aggregate
        if metric.name == "neighborhood_score":
            score = _score(done)
            if score is not None:
                found["score"] = score
    metrics = {name: agg for family in FAMILIES for name, agg in found.items() if agg["family"] == family}
    out.update({key: None for key in LEGACY_KEYS})
    out.update({name: agg["mean"] for name, agg in metrics.items()})
    out["metrics"] = metrics
    out["interval"] = {"confidence_level": CONFIDENCE_LEVEL, "method": "percentile bootstrap over cases",
                       "n_resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED}
    return out

def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
