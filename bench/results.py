"""Run folders (manifest with provenance, append-only per-case JSONL) and the run summary.

The summary aggregates each metric over the run's cases: the point estimate is the mean, and every
aggregate carries its n, its protocol label (protocol, scorer, comparable group, reference code; after
EasyEdit's `metric_meta`) and a 95% confidence interval from the percentile bootstrap over cases (Efron &
Tibshirani 1993, ch. 13; `scipy.stats.bootstrap`, 9,999 resamples, fixed seed, so a summary is
reproducible). Metrics are grouped in labelled families that are never averaged together:

* counterfact (sequence log-likelihood comparison, ROME's evaluation): ES, PS, NS, the magnitudes EM, PM,
  NM, recomputed from the per-prompt mean-token NLLs of record["post"] as rome's `summarize.py` does, and
  S, their harmonic mean (memit's `summarize.py`). S is a statistic of three means, so its interval
  resamples cases jointly (paired bootstrap). Also the harness's `log_p_new_lift`, ln P_post(new) −
  ln P_pre(new) with P the sequence probability on the rewrite prompt: a continuous companion of ES that
  the regression gate uses because a 0/1 rate on three facts is too coarse;
* easyedit (teacher-forced token accuracy, record["post_easyedit"]): reliability, generalization,
  portability, and locality (pre/post argmax agreement);
* generation (free generation, record["post_generation"]): generation success GS, generation entropy GE
  and reference score RS;
* drift: neighbourhood KL, and the perplexity change ppl_post − ppl_pre;
* circuit: every numeric `circuit_*` and `relation_*` field, and whether the edited layer is in the post-edit circuit;
* cost: seconds per edit and per circuit.

A failed case (status "failed": an exception or non-finite weights) counts as 0 in the success rates ES,
PS, NS, S, Rel, Gen and GS (`n_failed_counted` in their aggregate) and is left out of the other metrics.
Degenerate samples: no values gives no estimate; one value gives the mean with no interval (ci null);
constant values give the zero-width interval [c, c], which is what every resample yields. Fields that a
record lacks are skipped, so each metric's n counts the cases that report it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.scoring import harmonic_mean, pairs_from_record, scores_from_pairs
from lmview.io import append_jsonl
from lmview.paths import REPO_ROOT

CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0

FAMILIES: dict[str, str] = {
    "counterfact": "CounterFact", "easyedit": "EasyEdit", "generation": "Generation", "drift": "Drift",
    "circuit": "Circuit", "cost": "Cost",
}


@dataclass(frozen=True)
class Protocol:
    """How a metric is measured, after EasyEdit's `metric_meta`: two metrics are comparable only when
    their comparable_group is the same."""

    name: str  # e.g. "sequence log-likelihood comparison", "teacher-forced token accuracy", "free generation"
    scorer: str  # what is computed per prompt or text
    comparable_group: str
    reference: str  # the reference code that defines it, or "harness" for the harness's own metrics

    def as_dict(self) -> dict[str, str]:
        return {"protocol": self.name, "scorer": self.scorer, "comparable_group": self.comparable_group,
                "reference": self.reference}


@dataclass(frozen=True)
class Metric:
    """One per-case quantity: its family, a short column title, how to read it from a case record, which
    direction is an improvement (None: descriptive, never a regression), its protocol, and the value a
    failed case counts as (None: a failed case is left out, with n_failed reported beside it)."""

    name: str
    family: str
    label: str
    read: Callable[[dict[str, Any]], Any]
    higher_is_better: bool | None = True
    protocol: Protocol | None = None
    failure_value: float | None = None


def _field(*path: str) -> Callable[[dict[str, Any]], Any]:
    def read(record: dict[str, Any]) -> Any:
        value: Any = record
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return read


def _rome(key: str) -> Callable[[dict[str, Any]], Any]:
    """A CounterFact score recomputed from the record's per-prompt post-edit NLLs, as ROME's summarize does;
    None for records without them (older runs scored sequence sums, a different protocol)."""
    def read(record: dict[str, Any]) -> Any:
        pairs = pairs_from_record(record.get("post"))
        return None if pairs is None else scores_from_pairs(pairs)[key]

    return read


def _log_p_new_lift(record: dict[str, Any]) -> float | None:
    """ln P_post(target_new) - ln P_pre(target_new) on the rewrite prompt, P the sequence probability."""
    pre, post = _number(_field("pre", "log_p_new")(record)), _number(_field("post", "log_p_new")(record))
    if pre is not None and post is not None:
        return post - pre
    pre, post = _number(_field("pre", "p_new")(record)), _number(_field("post", "p_new")(record))
    if pre is None or post is None or pre <= 0 or post <= 0:
        return None
    return math.log(post) - math.log(pre)


def _ppl_delta(record: dict[str, Any]) -> float | None:
    pre, post = _number(record.get("ppl_pre")), _number(record.get("ppl_post"))
    return None if pre is None or post is None else post - pre


_ROME_EVAL = "kmeng01/rome experiments/py/eval_utils_counterfact.py (test_batch_prediction)"
_ROME_SUMMARY = "kmeng01/rome experiments/summarize.py"
_EASYEDIT_ACC = ("zjunlp/EasyEdit easyeditor/evaluate/evaluate_utils.py (test_prediction_acc), "
                 "evaluate.py (compute_rewrite_or_rephrase_quality)")
NLL_SUCCESS = Protocol("sequence log-likelihood comparison",
                       "per prompt, whether the wanted target has the lower mean per-token NLL; mean over prompts",
                       "counterfact.mean_token_nll.success", f"{_ROME_EVAL}; {_ROME_SUMMARY} (*_success)")
NLL_SCORE = Protocol("sequence log-likelihood comparison", "harmonic mean of the ES, PS and NS means",
                     "counterfact.mean_token_nll.score", "kmeng01/memit experiments/summarize.py (score)")
NLL_GAP = Protocol("sequence log-likelihood comparison",
                   "per prompt, exp(-mean NLL) of the wanted target minus that of the other; mean over prompts",
                   "counterfact.mean_token_prob.gap", f"{_ROME_EVAL}; {_ROME_SUMMARY} (*_diff)")
SEQUENCE_LIFT = Protocol("sequence log-likelihood change",
                         "ln P_post(target_new) - ln P_pre(target_new) on the rewrite prompt, P summed over tokens",
                         "harness.sequence_logprob.lift", "harness (regression gate)")
TOKEN_ACCURACY = Protocol("teacher-forced token accuracy",
                          "argmax token equals the answer token, mean over answer tokens, then over prompts",
                          "easyedit.decoder_only_teacher_forcing.token_accuracy", _EASYEDIT_ACC)
TOKEN_AGREEMENT = Protocol("teacher-forced token agreement, pre vs post edit",
                           "post-edit argmax token equals the pre-edit one at each answer position",
                           "easyedit.locality.pre_post_argmax_token_match",
                           "zjunlp/EasyEdit easyeditor/editors/editor.py (finalize_locality_metrics), "
                           "evaluate.py (compute_locality_quality)")
GREEDY_SUCCESS = Protocol("free generation", "greedy 20-token continuation contains target_new (case-insensitive)",
                          "generation.greedy20.substring_match", "harness (WILD evaluation, 'The Mirage of Model "
                          "Editing', 2025)")
GREEDY_ENTROPY = Protocol("free generation", "weighted 2-/3-gram entropy of prompt + greedy 20-token continuation",
                          "generation.greedy20.ngram_entropy",
                          f"{_ROME_EVAL.split(' (')[0]} (compute_n_gram_entropy; ROME samples 100 tokens top-5)")
GREEDY_TFIDF = Protocol("free generation", "TF-IDF cosine of the greedy continuations to reference texts",
                        "generation.greedy20.tfidf_reference",
                        f"{_ROME_EVAL.split(' (')[0]} (tfidf_similarity; ROME samples 100 tokens top-5)")
NEXT_TOKEN_KL = Protocol("next-token distribution", "KL(pre || post) of the next token after each neighbourhood prompt",
                         "drift.next_token_kl", "harness")
HELDOUT_PPL = Protocol("held-out perplexity", "ppl_post - ppl_pre on held-out Wikipedia texts",
                       "drift.heldout_ppl", "harness")
CIRCUIT = Protocol("circuit discovery (EAP)", "overlap or faithfulness of the pre/post-edit circuits",
                   "circuit.eap", "harness (hannamw/EAP-IG scoring)")
WALL_CLOCK = Protocol("wall-clock time", "seconds per edit or per circuit", "cost.seconds", "harness")

METRICS: list[Metric] = [
    Metric("efficacy_score", "counterfact", "ES", _rome("efficacy_score"), True, NLL_SUCCESS, 0.0),
    Metric("paraphrase_score", "counterfact", "PS", _rome("paraphrase_score"), True, NLL_SUCCESS, 0.0),
    Metric("neighborhood_score", "counterfact", "NS", _rome("neighborhood_score"), True, NLL_SUCCESS, 0.0),
    Metric("efficacy_magnitude", "counterfact", "EM", _rome("efficacy_magnitude"), True, NLL_GAP),
    Metric("paraphrase_magnitude", "counterfact", "PM", _rome("paraphrase_magnitude"), True, NLL_GAP),
    Metric("neighborhood_magnitude", "counterfact", "NM", _rome("neighborhood_magnitude"), True, NLL_GAP),
    Metric("log_p_new_lift", "counterfact", "ln P(new) lift", _log_p_new_lift, True, SEQUENCE_LIFT),
    Metric("reliability", "easyedit", "Rel", _field("post_easyedit", "reliability"), True, TOKEN_ACCURACY, 0.0),
    Metric("generalization", "easyedit", "Gen", _field("post_easyedit", "generalization"), True, TOKEN_ACCURACY,
           0.0),
    Metric("locality", "easyedit", "Loc", _field("post_easyedit", "locality"), True, TOKEN_AGREEMENT),
    Metric("portability", "easyedit", "Port", _field("post_easyedit", "portability"), True, TOKEN_ACCURACY),
    Metric("generation_success", "generation", "GS", _field("post_generation", "generation_success"), True,
           GREEDY_SUCCESS, 0.0),
    Metric("generation_entropy", "generation", "GE", _field("post_generation", "generation_entropy"), True,
           GREEDY_ENTROPY),
    Metric("reference_score", "generation", "RS", _field("post_generation", "reference_score"), True, GREEDY_TFIDF),
    Metric("drift_kl", "drift", "KL", _field("drift_kl"), False, NEXT_TOKEN_KL),
    Metric("ppl_delta", "drift", "ΔPPL", _ppl_delta, False, HELDOUT_PPL),
    Metric("circuit_edge_jaccard", "circuit", "Edge J", _field("circuit_edge_jaccard"), None, CIRCUIT),
    Metric("circuit_node_jaccard", "circuit", "Node J", _field("circuit_node_jaccard"), None, CIRCUIT),
    Metric("circuit_faithfulness_pre", "circuit", "Faith pre", _field("circuit_faithfulness_pre"), None, CIRCUIT),
    Metric("circuit_faithfulness_post", "circuit", "Faith post", _field("circuit_faithfulness_post"), None, CIRCUIT),
    Metric("seconds_per_edit", "cost", "s/edit", _field("seconds_edit"), None, WALL_CLOCK),
    Metric("seconds_per_circuit", "cost", "s/circuit", _field("seconds_circuit"), None, WALL_CLOCK),
]
SCORE = Metric("score", "counterfact", "S", lambda record: None, True, NLL_SCORE)  # a statistic of three means
SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")

# summary keys kept for readers of older summaries (null when a run has no such values)
LEGACY_KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
               "paraphrase_magnitude", "neighborhood_magnitude", "drift_kl", "circuit_edge_jaccard",
               "circuit_node_jaccard", "circuit_faithfulness_pre", "circuit_faithfulness_post",
               "edit_layer_in_circuit", "seconds_per_edit", "seconds_per_circuit"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    root = REPO_ROOT
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
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


RUN_STATES = ("running", "interrupted", "failed", "complete")


def code_sha256() -> str:
    """sha256 over the harness's Python sources (lmview/, bench/, editors/, circuits/): the code version a resume
    checks."""
    root = REPO_ROOT
    digest = hashlib.sha256()
    packages = ("lmview", "bench", "editors", "circuits")
    for path in sorted(p for package in packages for p in (root / package).rglob("*.py")):
        digest.update(f"{path.relative_to(root)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class RunLocked(ValueError):
    """Another process is running in this run folder."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run folder for as long as a process writes into it (freed when it dies)."""
    handle = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunLocked(f"{run_dir} is in use by another running process") from None
    try:
        yield
    finally:
        handle.close()


class RunWriter:
    """A run folder: manifest.json (with the run's state), cases.jsonl (one line per case) and summary.json.

    The state is "running" from the start, then "complete", "interrupted" or "failed"; summary.json
    carries the same state and `partial: true` for every state but "complete"."""

    def __init__(self, run_dir: Path, manifest: dict[str, Any], resume: bool = False):
        self.dir = run_dir
        self.cases_path = self.dir / "cases.jsonl"
        if resume:
            self.manifest = dict(manifest, status="running")
            self.manifest["resumed"] = [*manifest.get("resumed", []), now()]
            self.manifest.pop("error", None)
        else:
            self.dir.mkdir(parents=True, exist_ok=False)
            self.manifest = dict(manifest, started=now(), commit=git_commit(), code_sha256=code_sha256(),
                                 versions=library_versions(), host=platform.node(), status="running")
            self.cases_path.touch()
        self._lock = ExitStack()
        self._lock.enter_context(run_lock(self.dir))
        self.write_manifest()

    def write_manifest(self) -> None:
        _atomic_json(self.dir / "manifest.json", self.manifest)

    def append(self, record: dict[str, Any]) -> None:
        """One line per case, flushed to disk before the next case starts."""
        append_jsonl(self.cases_path, record, default=_jsonable)

    def finish(self, extra: dict[str, Any], status: str = "complete", error: str | None = None) -> dict[str, Any]:
        if status not in RUN_STATES:
            raise ValueError(f"unknown run state {status!r}")
        summary = summarize(read_cases(self.cases_path))
        summary.update(editor=self.manifest["editor"], model=self.manifest["model"]["name"],
                       dataset=self.manifest["dataset"]["name"], **extra)
        summary.update(status=status, partial=status != "complete", n_planned=self.manifest.get("n_planned"))
        if error:
            summary["error"] = error
        _atomic_json(self.dir / "summary.json", summary)
        self.manifest.update(finished=now(), status=status)
        if error:
            self.manifest["error"] = error
        self.write_manifest()
        self._lock.close()
        return summary


def read_cases(path: Path) -> list[dict[str, Any]]:
    """The case records, skipping lines that are not JSON objects (a line cut by an interruption)."""
    return read_case_lines(path).rows


@dataclass
class CaseLines:
    """cases.jsonl as read: its object lines, a torn last line if any, and any other bad lines."""

    rows: list[dict[str, Any]]
    torn: str | None = None  # why the last line is unusable (no newline, or not JSON)
    bad: list[str] = field(default_factory=list)  # "line N: why", for lines before the last
    good_bytes: int = 0  # the length of the file up to the end of the last good line


def read_case_lines(path: Path) -> CaseLines:
    data = path.read_bytes()
    out = CaseLines([])
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    offset = 0
    for number, raw in enumerate(complete, start=1):
        offset += len(raw) + 1
        problem, row = _parse_line(raw)
        if problem is None:
            out.rows.append(row)
            out.good_bytes = offset
        elif number == len(complete) and not tail.strip():
            out.torn = f"line {number} {problem}"
        elif raw.strip():
            out.bad.append(f"line {number} {problem}")
    if tail.strip():
        out.torn = f"line {len(complete) + 1} has no newline ({len(tail)} bytes)"
    return out


def _parse_line(raw: bytes) -> tuple[str | None, Any]:
    if not raw.strip():
        return "is empty", None
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "is not valid JSON", None
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object", None
    return None, row


def drop_torn_tail(path: Path) -> str | None:
    """Cuts a torn last line off cases.jsonl; returns what was wrong with it, or None."""
    lines = read_case_lines(path)
    if lines.torn is None:
        return None
    with open(path, "r+b") as handle:
        handle.truncate(lines.good_bytes)
        handle.flush()
        os.fsync(handle.fileno())
    return lines.torn


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


def _aggregate(metric: Metric, point: float | None, n: int, interval: tuple[float, float] | None,
               n_failed_counted: int = 0) -> dict[str, Any]:
    out = {"family": metric.family, "label": metric.label, "mean": point, "n": n,
           "ci_low": interval[0] if interval else None, "ci_high": interval[1] if interval else None,
           "higher_is_better": metric.higher_is_better}
    if metric.protocol is not None:
        out.update(metric.protocol.as_dict())
    if metric.failure_value is not None:
        out["n_failed_counted"] = n_failed_counted  # failed cases in n, each counted as failure_value
    return out


def _values(metric: Metric, done: list[dict[str, Any]], n_failed: int) -> tuple[list[float], int]:
    """The metric's per-case values over the finished cases, plus failure_value once per failed case
    (when the metric counts failures and some finished case reports it, or none finished)."""
    values = [v for v in (_number(metric.read(c)) for c in done) if v is not None]
    if metric.failure_value is None or n_failed == 0 or (done and not values):
        return values, 0
    return values + [metric.failure_value] * n_failed, n_failed


def _metric_of(metric: Metric, done: list[dict[str, Any]], n_failed: int = 0) -> dict[str, Any] | None:
    values, counted = _values(metric, done, n_failed)
    if not values:
        return None
    return _aggregate(metric, sum(values) / len(values), len(values), bootstrap_interval([values], np.mean),
                      counted)


def _score(done: list[dict[str, Any]], n_failed: int = 0) -> dict[str, Any] | None:
    """S over the cases that report all of ES, PS and NS (a failed case counts as 0 in each), with a
    paired interval."""
    readers = {m.name: m for m in METRICS if m.name in SCORE_PARTS}
    rows = [[_number(readers[name].read(c)) for name in SCORE_PARTS] for c in done]
    rows = [row for row in rows if all(v is not None for v in row)]
    counted = n_failed if rows or not done else 0
    rows += [[readers[name].failure_value for name in SCORE_PARTS]] * counted
    if not rows:
        return None
    columns = [np.array(col, dtype=float) for col in zip(*rows)]
    point = harmonic_mean([float(col.mean()) for col in columns])
    return _aggregate(SCORE, point, len(rows), bootstrap_interval(columns, harmonic_of_means), counted)


def _extra_circuit_metrics(cases: list[dict[str, Any]]) -> list[Metric]:
    """Numeric circuit_* and relation_* (--relation-circuits) fields beyond the known ones."""
    known = {m.name for m in METRICS}
    names = sorted({k for c in cases for k, v in c.items()
                    if k.startswith(("circuit_", "relation_")) and k not in known and _number(v) is not None
                    and not isinstance(v, (dict, list, tuple))})
    return [Metric(name, "circuit", name.removeprefix("circuit_").replace("_", " "), _field(name), None, CIRCUIT)
            for name in names]


COLLAPSE_PPL_RATIO = 10.0
COLLAPSE_CRITERION = f"ppl_post / ppl_pre > {COLLAPSE_PPL_RATIO:g}, or a non-finite ppl_post"


def ppl_collapsed(ppl: float | None, ppl_base: float | None) -> bool:
    """COLLAPSE_CRITERION on one perplexity against the unedited one (False without a base)."""
    base = _number(ppl_base)
    if base is None:
        return False
    value = _number(ppl)
    return value is None or value / base > COLLAPSE_PPL_RATIO


def collapsed(record: dict[str, Any]) -> bool:
    """Whether the edit collapsed the model: held-out perplexity more than 10x the unedited one, or not
    finite (a non-finite value is stored as null). False when the case has no perplexity."""
    if "ppl_post" not in record:
        return False
    return ppl_collapsed(record.get("ppl_post"), record.get("ppl_pre"))


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric mean, n and bootstrap interval over the run's cases, grouped by family; the means
    also appear as flat keys (`efficacy_score`, `score`, ...). Finished cases give their values; a failed
    case counts as a failure (failure_value, 0) in the success rates ES, PS, NS, S, Rel, Gen and GS and is
    left out of the other metrics."""
    done = [c for c in cases if c.get("status") == "ok"]
    n_failed = sum(c.get("status") == "failed" for c in cases)
    out: dict[str, Any] = {"n_cases": len(done), "n_failed": n_failed,
                           "n_collapsed": sum(collapsed(c) for c in done), "collapse_criterion": COLLAPSE_CRITERION,
                           "scoring": sorted({str(c["scoring"]) for c in done if c.get("scoring")})}
    found: dict[str, dict[str, Any]] = {}
    for metric in METRICS + _extra_circuit_metrics(done):
        aggregate = _metric_of(metric, done, n_failed)
        if aggregate is not None:
            found[metric.name] = aggregate
        if metric.name == "neighborhood_score":
            score = _score(done, n_failed)
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
