"""The leaderboard: the latest run per editor, one table per (model, dataset), with intervals.

Every cell is a metric's mean over the run's cases with its 95% percentile-bootstrap interval, as
`bench.results.summarize` computes it from the run's cases.jsonl (so older run folders get intervals
too). Columns are grouped by metric family and families are never averaged together. Sequential
(lifelong) runs are not rows of those tables: their sequential.jsonl curves get their own tables (the last
point of each, then every point) and a plot. Each row has a
provenance footnote: run id, model checksum, dataset hash, harness commit, device.

Formats: markdown (default), JSON (everything, nested) and CSV (one line per row and metric).
`--plots DIR` writes PNGs with matplotlib: per family a bar chart of each metric with interval error
bars, efficacy against circuit overlap (one point per editor), and the sequential-editing curves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tabulate import tabulate

from bench.lens import TOP_K, lens_summary
from bench.plotting import pyplot, save_figure
from bench.results import (COLLAPSE_CRITERION, FAMILIES, METRICS, ppl_collapsed, read_case_lines, read_cases,
                           summarize)
from bench.scoring import harmonic_mean
from lmview.io import read_mapping

# metrics left out of the markdown table (still in JSON and CSV)
HIDDEN_IN_MARKDOWN = {"paraphrase_magnitude", "neighborhood_magnitude", "seconds_per_circuit"}
METRIC_ORDER = [m.name for m in METRICS]
METRIC_ORDER.insert(METRIC_ORDER.index("neighborhood_score") + 1, "score")
SEQUENTIAL_PANELS = [("efficacy", "efficacy (ES)"), ("neighborhood", "neighbourhood (NS)"), ("ppl", "perplexity"),
                     ("update_norm", "‖W_t − W_0‖ (all edited tensors)")]


@dataclass
class RunRow:
    """One run folder: its summary (recomputed from cases.jsonl when present) and manifest."""

    run_id: str
    path: Path
    summary: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    pre_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # case id -> pre-edit ES/PS/NS

    @property
    def editor(self) -> str:
        return str(self.summary.get("editor") or self.manifest.get("editor", "?"))

    @property
    def model(self) -> str:
        return str(self.summary.get("model") or (self.manifest.get("model") or {}).get("name", "?"))

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or (self.manifest.get("dataset") or {}).get("name", "?"))

    @property
    def batch_size(self) -> int:
        return int(self.summary.get("batch_size") or (self.manifest.get("mode") or {}).get("batch_size") or 1)

    @property
    def sequential(self) -> bool:
        mode = self.summary.get("mode") or (self.manifest.get("mode") or {}).get("name")
        return mode == "sequential" or (self.path / "sequential.jsonl").exists()

    @property
    def finished(self) -> str:
        return str(self.manifest.get("finished") or self.manifest.get("started") or "")

    @property
    def variant(self) -> str | None:
        """The hyperparameter file's stem when it is not one of the editor's shipped files."""
        hparams_file = self.manifest.get("hparams_file")
        if not hparams_file or Path(hparams_file).parent.name == self.editor:
            return None
        return Path(hparams_file).stem

    @property
    def known_only(self) -> bool:
        """Whether the run edited only facts the model knew (the harness's filter, not the protocol's)."""
        selection = self.summary.get("case_selection")
        if selection is not None:
            return selection == "known-only"
        return bool((self.manifest.get("config") or {}).get("only_known", False))

    @property
    def status(self) -> str:
        """complete, interrupted, failed or running (a killed run); older folders: the manifest's state,
        else complete when the run has a summary and a finish time."""
        status = self.summary.get("status") or self.manifest.get("status")
        if status:
            return str(status)
        return "complete" if self.manifest.get("finished") and (self.path / "summary.json").exists() else "running"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def n_attempted(self) -> int:
        return int(self.summary.get("n_cases") or 0) + int(self.summary.get("n_failed") or 0)

    @property
    def label(self) -> str:
        label = self.editor if self.variant is None else f"{self.editor} [{self.variant}]"
        label = f"{label} [known-only]" if self.known_only else label
        label = label if self.batch_size == 1 else f"{label} (batch {self.batch_size})"
        return label if self.complete else f"{label} (partial: {self.status})"

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return self.summary.get("metrics") or {}

    @property
    def counts(self) -> dict[str, int | None]:
        """Records loaded, rejected, skipped as unknown to the model, edited and failed."""
        selection = self.manifest.get("cases") or {}

        def count(summary_key: str, manifest_key: str) -> int | None:
            value = self.summary.get(summary_key, selection.get(manifest_key))
            return int(value) if isinstance(value, (int, float)) else None

        return {"loaded": count("n_loaded", "loaded"), "rejected": count("n_rejected", "rejected"),
                "unknown_skipped": count("n_unknown_skipped", "unknown_skipped"),
                "edited": count("n_cases", "-"), "failed": count("n_failed", "-")}

    @property
    def n_collapsed(self) -> int:
        return int(self.summary.get("n_collapsed") or 0)

    def provenance(self) -> dict[str, Any]:
        model = self.manifest.get("model") or {}
        dataset = self.manifest.get("dataset") or {}
        return {"run_id": self.run_id, "model_sha256": model.get("sha256"), "dataset_sha256": dataset.get("sha256"),
                "commit": self.manifest.get("commit"), "device": self.manifest.get("device") or self.summary.get("device"),
                "seed": self.manifest.get("seed"), "finished": self.manifest.get("finished")}


class DamagedRun(ValueError):
    """A run folder that cannot be read: skipped, with a warning naming it."""


def _json_object(path: Path) -> dict[str, Any]:
    return read_mapping(path, lambda reason: DamagedRun(f"{path.name} is not valid JSON ({reason})"),
                        lambda data: DamagedRun(f"{path.name} is a JSON {type(data).__name__}, not an object"))


def _check_fields(name: str, data: dict[str, Any], objects: tuple[str, ...], texts: tuple[str, ...]) -> None:
    for key in objects:
        if key in data and not isinstance(data[key], (dict, type(None))):
            raise DamagedRun(f"{name}: '{key}' is a {type(data[key]).__name__}, not an object")
    for key in texts:
        if key in data and not isinstance(data[key], (str, type(None))):
            raise DamagedRun(f"{name}: '{key}' is a {type(data[key]).__name__}, not a string")


def load_run(folder: Path) -> RunRow:
    """A run folder's manifest, stored summary and recomputed aggregates; DamagedRun when any is unreadable."""
    manifest_path, summary_path, cases_path = folder / "manifest.json", folder / "summary.json", folder / "cases.jsonl"
    manifest = _json_object(manifest_path) if manifest_path.exists() else {}
    _check_fields("manifest.json", manifest, ("model", "dataset", "mode", "cases"), ("editor", "status", "finished"))
    stored = _json_object(summary_path) if summary_path.exists() else {}
    _check_fields("summary.json", stored, ("metrics",), ("editor", "model", "dataset", "status"))
    summary = dict(stored)
    if cases_path.exists():
        lines = read_case_lines(cases_path)
        if lines.bad:
            raise DamagedRun(f"cases.jsonl {lines.bad[0]}")
        if lines.torn:
            warn(f"{folder}: cases.jsonl {lines.torn}: a torn last line, dropped")
        summary.update(summarize(lines.rows))
        summary["lens"] = lens_summary(lines.rows)
        return RunRow(folder.name, folder, summary, manifest, case_pre_scores(lines.rows))
    return RunRow(folder.name, folder, summary, manifest)


_WARNED: set[str] = set()  # each warning once per command (the plots and the tables read the same runs)


def warn(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: leaderboard: {message}", file=sys.stderr)


def load_runs(runs_dir: Path) -> list[RunRow]:
    """Every run folder (one with a manifest or a summary), in any state; damaged folders are skipped with a
    warning that names them and what is wrong."""
    folders = sorted({p.parent for pattern in ("*/summary.json", "*/manifest.json") for p in runs_dir.glob(pattern)})
    rows = []
    for folder in folders:
        try:
            rows.append(load_run(folder))
        except (DamagedRun, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            warn(f"skipped {folder}: {exc}")
    return rows


def _latest_per_label(runs: list[RunRow], keep: Callable[[RunRow], bool]) -> dict[tuple[str, str, str], RunRow]:
    """(model, dataset, label) -> the kept run with the most attempted cases, the latest among equals: a
    smaller run never silently replaces a larger one (a warning says which run was kept)."""
    chosen: dict[tuple[str, str, str], RunRow] = {}
    for row in sorted(runs, key=lambda r: (r.finished, r.run_id)):
        if not keep(row):
            continue
        key = (row.model, row.dataset, row.label)
        held = chosen.get(key)
        if held is not None and row.n_attempted < held.n_attempted:
            warn(f"kept {held.run_id} ({held.n_attempted} cases) for {row.label} on {row.model} · {row.dataset} "
                 f"over the newer but smaller {row.run_id} ({row.n_attempted} cases)")
            continue
        chosen[key] = row
    return chosen


def latest_rows(runs: list[RunRow], include_partial: bool = False) -> list[RunRow]:
    """The latest non-sequential run per (model, dataset, label): editor, variant and batch size; complete
    runs only unless include_partial (partial runs then have their own, marked label)."""
    return list(_latest_per_label(runs, lambda row: not row.sequential and (row.complete or include_partial)).values())


def latest_sequential(runs: list[RunRow], include_partial: bool = False) -> dict[tuple[str, str], list[RunRow]]:
    """(model, dataset) -> the latest sequential run per label, in label order."""
    out: dict[tuple[str, str], list[RunRow]] = {}

    def keep(row: RunRow) -> bool:
        return (row.path / "sequential.jsonl").exists() and (row.complete or include_partial)

    for (model, dataset, _), row in sorted(_latest_per_label(runs, keep).items()):
        out.setdefault((model, dataset), []).append(row)
    return out


def _numeric(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def collapsed_at(points: list[dict[str, Any]]) -> int | None:
    """The edits after which a sequential curve first collapsed (a point's perplexity over 10x the first
    point's, or not finite; COLLAPSE_CRITERION), None when it never did."""
    if not points or _numeric(points[0].get("ppl")) is None:
        return None
    for point in points[1:]:
        if point.get("collapsed") or ppl_collapsed(point.get("ppl"), points[0]["ppl"]):
            return point.get("n_edits")
    return None


def curve_collapsed(points: list[dict[str, Any]]) -> bool:
    return collapsed_at(points) is not None


def update_norm(point: dict[str, Any]) -> float | None:
    """‖W_t − W_0‖ over every tensor edited so far, as one vector: the root of the per-tensor squared
    Frobenius norms the curve point records (0 before any edit; None when the point records no tensor, as
    for an editor that keeps its edits outside the model's weights, e.g. WISE's side memory)."""
    if point.get("n_edits") == 0:
        return 0.0
    weights = point.get("weights")
    if not isinstance(weights, list) or not weights:
        return None
    norms = [_numeric(w.get("delta_norm")) for w in weights if isinstance(w, dict)]
    return None if any(n is None for n in norms) else math.sqrt(sum(n * n for n in norms))


def _cell(value: float | None) -> str:
    return "–" if value is None else number(value)


def unedited_cell(point: dict[str, Any]) -> str:
    """The unedited model's ES / NS on the cases the point re-scored (recorded by runs since it existed)."""
    unedited = point.get("unedited")
    if not isinstance(unedited, dict):
        return "–"
    return f"{_cell(_numeric(unedited.get('efficacy')))} / {_cell(_numeric(unedited.get('neighborhood')))}"


def _table_without_empty(header: list[str], body: list[list[Any]], optional: str) -> str:
    """The github table, leaving out the column `optional` when none of its cells has a value."""
    column = header.index(optional)
    if all(line[column] == "–" for line in body):
        header = header[:column] + header[column + 1:]
        body = [line[:column] + line[column + 1:] for line in body]
    return tabulate(body, headers=header, tablefmt="github", disable_numparse=True) if body else ""


def sequential_table(rows: list[RunRow], first_note: int = 1) -> str:
    """The last point of each sequential curve: the edits so far re-scored, the perplexity drift and the
    size of the accumulated update."""
    header = ["Editor", "edits", "ES", "PS", "NS", "S", "unedited ES / NS", "PPL before", "PPL after", "ΔPPL",
              "‖W_t − W_0‖"]
    body = []
    for index, row in enumerate(rows, start=first_note):
        points = read_curve(row.path / "sequential.jsonl")
        if not points:
            continue
        first, last = points[0], points[-1]
        ppl0, ppl1 = _numeric(first.get("ppl")), _numeric(last.get("ppl"))
        drift = ppl1 - ppl0 if ppl0 is not None and ppl1 is not None else None
        values = [_numeric(last.get(k)) for k in ("efficacy", "paraphrase", "neighborhood", "score")]
        at = collapsed_at(points)
        mark = "" if at is None else f" {COLLAPSED_MARK} at {at} edits"
        body.append([f"{row.label} [{index}]{mark}", last.get("n_edits"), *(_cell(v) for v in values),
                     unedited_cell(last), *(_cell(v) for v in (ppl0, ppl1, drift, update_norm(last)))])
    return _table_without_empty(header, body, "unedited ES / NS")


def curve_table(rows: list[RunRow], first_note: int = 1) -> str:
    """Every point of each sequential curve: the edits so far, the cases re-scored at that point, the
    scores, the perplexity and its ratio to the unedited model's, and the accumulated update."""
    header = ["Editor", "edits", "scored", "ES", "PS", "NS", "S", "unedited ES / NS", "PPL", "PPL / PPL₀",
              "‖W_t − W_0‖", "collapsed"]
    body = []
    for index, row in enumerate(rows, start=first_note):
        for point in read_curve(row.path / "sequential.jsonl"):
            scores = [_numeric(point.get(k)) for k in ("efficacy", "paraphrase", "neighborhood", "score")]
            drift = [_numeric(point.get(k)) for k in ("ppl", "ppl_ratio")]
            body.append([f"{row.label} [{index}]", point.get("n_edits"), point.get("n_scored", "–"),
                         *(_cell(v) for v in scores), unedited_cell(point),
                         *(_cell(v) for v in (*drift, update_norm(point))), "yes" if point.get("collapsed") else "no"])
    return _table_without_empty(header, body, "unedited ES / NS")


def grouped(rows: list[RunRow]) -> dict[tuple[str, str], list[RunRow]]:
    """(model, dataset) -> rows, best S first (rows without S last), then by editor; `[known-only]` rows,
    on other cases, are ranked after the rows of every record."""
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for row in sorted(rows, key=lambda r: (r.model, r.dataset)):
        groups.setdefault((row.model, row.dataset), []).append(row)
    for members in groups.values():
        members.sort(key=_rank)
    return groups


def _rank(row: RunRow) -> tuple[bool, bool, float, str]:
    score = _mean(row, "score")
    return row.known_only, score is None, -(score or 0.0), row.label


def _mean(row: RunRow, name: str) -> float | None:
    return (row.metrics.get(name) or {}).get("mean")


@dataclass(frozen=True)
class Column:
    """One metric column: a metric under one protocol (comparable group), never two."""

    name: str
    group: str | None
    label: str
    family: str

    def aggregate(self, row: RunRow) -> dict[str, Any] | None:
        agg = row.metrics.get(self.name)
        return agg if agg is not None and agg.get("comparable_group") == self.group else None


def metric_columns(rows: list[RunRow], markdown: bool = False) -> list[Column]:
    """Metrics reported by any row, in family order; a metric whose rows disagree on the comparable group
    gets one column per group."""
    found: dict[tuple[str, str | None], Column] = {}
    for row in rows:
        for name, agg in row.metrics.items():
            key = (name, agg.get("comparable_group"))
            found.setdefault(key, Column(name, key[1], agg["label"], agg["family"]))
    split = {name for name, _ in found if sum(n == name for n, _ in found) > 1}
    columns = [Column(c.name, c.group, f"{c.label} ({c.group})" if c.name in split else c.label, c.family)
               for c in found.values()]
    order = {name: i for i, name in enumerate(METRIC_ORDER)}
    columns.sort(key=lambda c: (list(FAMILIES).index(c.family) if c.family in FAMILIES else len(FAMILIES),
                                order.get(c.name, len(order)), c.name, c.group or ""))
    return [c for c in columns if not (markdown and c.name in HIDDEN_IN_MARKDOWN)]


# --- markdown ------------------------------------------------------------------------------

def number(value: float) -> str:
    """At most 4 significant figures: 0.90, 21.5, 206, 1234, 3.04e+46, 1.40e-05."""
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    size = abs(value)
    if size >= 1e4 or 0 < size < 1e-3:
        return f"{value:.2e}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 0.1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"


def interval_cell(aggregate: dict[str, Any] | None, n_cases: int) -> str:
    """`0.90 [0.78, 1.00]`, with `(n=k)` when the metric covers fewer or more cases than the row."""
    if not aggregate or aggregate.get("mean") is None:
        return "–"
    text = number(aggregate["mean"])
    if aggregate.get("ci_low") is not None and aggregate.get("ci_high") is not None:
        text += f" [{number(aggregate['ci_low'])}, {number(aggregate['ci_high'])}]"
    if aggregate.get("n") != n_cases:
        text += f" (n={aggregate.get('n')})"
    return text


def mean_cell(aggregate: dict[str, Any] | None) -> str:
    return "–" if not aggregate or aggregate.get("mean") is None else number(aggregate["mean"])


COLLAPSED_MARK = "⚠ collapsed"
FAMILY_TITLES = {
    "counterfact": "CounterFact: sequence log-likelihood comparison (ROME's evaluation)",
    "easyedit": "EasyEdit: teacher-forced token accuracy",
    "generation": "Free generation (greedy, no teacher forcing)",
    "drift": "Drift: next-token KL and held-out perplexity",
    "circuit": "Circuits (EAP, pre vs post edit)",
    "cost": "Cost",
}
HEADLINE = {"counterfact": ["efficacy_score", "paraphrase_score", "neighborhood_score", "score", "ppl_delta"],
            "zsre": ["reliability", "generalization", "locality", "portability", "ppl_delta"]}


def headline_names(rows: list[RunRow]) -> list[str]:
    """zsRE-scored datasets lead with the EasyEdit family, the others with CounterFact's."""
    scorings = {s for row in rows for s in row.summary.get("scoring") or []}
    return HEADLINE["zsre" if scorings == {"zsre"} else "counterfact"]


def row_title(row: RunRow, index: int | None) -> str:
    title = row.label if index is None else f"{row.label} [{index}]"
    if row.n_collapsed:
        title += f" {COLLAPSED_MARK} ({row.n_collapsed}/{row.counts['edited']})"
    return title


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def headline_table(rows: list[RunRow], first_note: int | None = 1) -> str:
    """Per row: the metrics a reader compares first (means), and the record counts."""
    columns = {c.name: c for c in metric_columns(rows)}
    names = [n for n in headline_names(rows) if n in columns]
    headers = ["Editor", *(columns[n].label for n in names), "edited", "failed", "loaded / rejected / unknown"]
    body = []
    for offset, row in enumerate(rows):
        counts = row.counts
        body.append([row_title(row, None if first_note is None else first_note + offset),
                     *(mean_cell(columns[n].aggregate(row)) for n in names), _count(counts["edited"]),
                     _count(counts["failed"]), " / ".join(_count(counts[k]) for k in ("loaded", "rejected",
                                                                                      "unknown_skipped"))])
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def family_table(rows: list[RunRow], columns: list[Column], first_note: int | None = 1) -> str:
    """One family's metrics with intervals; n is the row's cases (edited + failed)."""
    headers = ["Editor", "n"] + [c.label for c in columns]
    body = []
    for offset, row in enumerate(rows):
        n = (row.counts["edited"] or 0) + (row.counts["failed"] or 0)
        body.append([row_title(row, None if first_note is None else first_note + offset), n]
                    + [interval_cell(c.aggregate(row), n) for c in columns])
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


UNEDITED_KEYS = {"ES": "efficacy_score", "PS": "paraphrase_score", "NS": "neighborhood_score"}


def case_pre_scores(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each edited case's pre-edit ES, PS and NS, by case id."""
    found = {}
    for record in records:
        pre = record.get("pre") or {}
        if record.get("status") == "ok" and all(pre.get(k) is not None for k in UNEDITED_KEYS.values()):
            found[str(record.get("case_id"))] = {k: float(pre[k]) for k in UNEDITED_KEYS.values()}
    return found


def unedited_scores(rows: list[RunRow]) -> tuple[dict[str, float], int] | None:
    """ES, PS, NS (means) and S of the unedited model on the section's cases: each case's pre-edit scores
    (the same weights for every editor; the first run that has the case gives them), and the case count."""
    per_case: dict[str, dict[str, float]] = {}
    for row in rows:
        for case_id, scores in row.pre_scores.items():
            per_case.setdefault(case_id, scores)
    if not per_case:
        return None
    means = {label: sum(c[key] for c in per_case.values()) / len(per_case) for label, key in UNEDITED_KEYS.items()}
    means["S"] = harmonic_mean(list(means.values()))
    return means, len(per_case)


def unedited_line(rows: list[RunRow]) -> list[str]:
    """Lines under the headline: the scores an edit that changes nothing would get (ROME's tables list
    the unedited model as a row), one per case selection (every record, known-only)."""
    if headline_names(rows) != HEADLINE["counterfact"]:
        return []
    lines = []
    for known_only in (False, True):
        found = unedited_scores([row for row in rows if row.known_only == known_only])
        if found is None:
            continue
        means, n = found
        scores = ", ".join(f"{label} {number(value)}" for label, value in means.items())
        which = "the `[known-only]` rows'" if known_only else "the same"
        lines += [f"Unedited model, the pre-edit scores of {which} {n} cases: {scores}. An edit that changes "
                  "nothing keeps NS at this value; ES and PS start from it.", ""]
    return lines


def section_tables(rows: list[RunRow], first_note: int | None = 1) -> list[str]:
    """The headline table, then one table per family (markdown lines)."""
    parts = ["**Headline** (means; counts of records: edited, failed, and loaded / rejected / skipped as "
             "unknown to the model):", "", headline_table(rows, first_note), "", *unedited_line(rows)]
    columns = metric_columns(rows, markdown=True)
    for family in FAMILIES:
        members = [c for c in columns if c.family == family]
        if members:
            parts += [f"#### {FAMILY_TITLES.get(family, family)}", "", family_table(rows, members, first_note), ""]
    return parts


def legend(rows: list[RunRow]) -> str:
    """Each metric's protocol label, as summary.json states it."""
    body, seen = [], set()
    for column in metric_columns(rows):
        agg = next((column.aggregate(r) for r in rows if column.aggregate(r)), {}) or {}
        if (column.name, column.group) in seen:
            continue
        seen.add((column.name, column.group))
        body.append([column.label, column.name, agg.get("protocol", "–"), agg.get("scorer", "–"),
                     f"`{column.group}`" if column.group else "–", agg.get("reference", "–")])
    return tabulate(body, headers=["Metric", "key", "protocol", "scorer", "comparable group", "reference"],
                    tablefmt="github", disable_numparse=True)


def markdown_table(rows: list[RunRow], first_note: int = 1) -> tuple[str, list[str]]:
    """The section's tables, and its provenance notes numbered from first_note."""
    notes = [provenance_note(index, row) for index, row in enumerate(rows, start=first_note)]
    return "\n".join(section_tables(rows, first_note) + lens_table(rows)).rstrip(), notes


def _layer(value: Any) -> str:
    return "never" if value is None else str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _mean_of(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def lens_table(rows: list[RunRow]) -> list[str]:
    """The logit-lens summary per editor (bench/lens.py), when the runs stored it."""
    lensed = [row for row in rows if row.summary.get("lens")]
    if not lensed:
        return []
    body = []
    for row in lensed:
        lens = row.summary["lens"]
        movers = lens.get("mover_heads")
        body.append([row.label, lens["n_cases"], _layer(lens["pre_new_first_top_layer"]),
                     _layer(lens["post_new_first_top_layer"]), _layer(lens["post_new_first_top_layer_case_median"]),
                     number(lens["post_new_reaches_top_share"]),
                     f"{number(lens['pre_new_prob_mean'][-1])} → {number(lens['post_new_prob_mean'][-1])}",
                     f"{number(_mean_of(lens['mover_attention_pre']))} → {number(_mean_of(lens['mover_attention_post']))}"
                     if movers else "–"])
    headers = ["editor", "n", f"target_new in top {TOP_K} from layer (pre)", "(post)", "(post, per-case median)",
               "share of cases reaching it (post)", "P(target_new) at the last layer", "top-5 subject heads' attention"]
    return [f"#### Logit lens (target_new's first token through the layers; layers 0-based; median rank per layer; "
            f"top-5 subject heads: the heads with the most pre-edit attention from the last token to the subject)",
            "", tabulate(body, headers=headers, tablefmt="github", disable_numparse=True), ""]


def _short(value: Any, k: int = 12) -> str:
    return f"`{str(value)[:k]}`" if value else "unknown"


def provenance_note(index: int, row: RunRow) -> str:
    p = row.provenance()
    return (f"[{index}] run `{p['run_id']}`: model sha256 {_short(p['model_sha256'])}, dataset sha256 "
            f"{_short(p['dataset_sha256'])}, harness commit {_short(p['commit'], 14)}, device {p['device'] or 'unknown'}, "
            f"seed {p['seed']}, finished {p['finished'] or 'unknown'}")


def to_markdown(groups: dict[tuple[str, str], list[RunRow]], command: str | None, runs_dir: Path,
                charts: dict[tuple[str, str], list[str]] | None = None,
                sequential: dict[tuple[str, str], list[RunRow]] | None = None) -> str:
    """One section per (model, dataset); `charts` (links relative to the markdown file) are embedded."""
    parts = ["# Leaderboard", ""]
    source = f"Generated from the run folders in `{runs_dir}`" + (f" by `{command}`." if command else ".")
    parts += [source + " Each row is the latest run of an editor on a (model, dataset); `[known-only]` rows "
              "edited only facts the model knew (the harness's filter), the others every valid record as the "
              "protocols do. Sequential-editing runs are summarised by their last curve point (every edit so "
              "far re-scored) and plotted. Each section leads with a headline table, then one table per protocol "
              "family. A family-table cell is the mean over the run's cases with its 95% percentile-bootstrap "
              "confidence interval over cases, `mean [low, high]`; `(n=k)` marks a metric measured on another "
              "number of cases than the row's n (edited + failed: a failed case counts 0 in ES, PS, NS, S, Rel, "
              f"Gen and GS and is left out of the rest). `{COLLAPSED_MARK} (k/n)`: k edits left the model with "
              f"{COLLAPSE_CRITERION}. Families are never averaged together; each metric's protocol is in the "
              "legend at the end and in docs/metrics.md. `[k]` refers to the run's provenance note.", ""]
    sequential = sequential or {}
    if not groups and not sequential:
        parts.append("No runs yet.")
    note = 1
    for model, dataset in [*groups, *(key for key in sequential if key not in groups)]:
        rows = groups.get((model, dataset), [])
        parts += [f"## {model} · {dataset}", ""]
        if rows:
            tables, notes = markdown_table(rows, note)
            note += len(rows)
            parts += [tables, ""]
            parts += [line + "  " for line in notes] + [""]
        if sequential.get((model, dataset)):
            seq_rows = sequential[(model, dataset)]
            parts += ["Sequential editing (edits accumulate; ES/PS/NS/S re-scored at the last point over every edit "
                      "so far, or over the edited cases of the run's fixed `--eval-sample`; unedited ES / NS: the "
                      "same cases on the unedited weights; perplexity on held-out "
                      "Wikipedia text; ‖W_t − W_0‖: the accumulated update of every edited tensor, Frobenius):", "",
                      sequential_table(seq_rows, note), "", "Every curve point:", "", curve_table(seq_rows, note), ""]
            parts += [f"{provenance_note(note + i, row)}  " for i, row in enumerate(seq_rows)] + [""]
            note += len(seq_rows)
        parts += [f"![{Path(link).stem}]({link})" for link in (charts or {}).get((model, dataset), [])]
        parts += [""] if (charts or {}).get((model, dataset)) else []
    every_row = [row for rows in groups.values() for row in rows]
    if every_row:
        parts += ["## Metric legend", "", legend(every_row), ""]
    return "\n".join(parts).rstrip() + "\n"


def render(summaries: list[dict[str, Any]]) -> str:
    """The headline and family tables of run summaries (printed after `bench run`)."""
    rows = [RunRow(str(s.get("run_id", "")), Path("."), s) for s in summaries]
    return "\n".join(section_tables(rows, None)).rstrip()


# --- json and csv --------------------------------------------------------------------------

def to_json(groups: dict[tuple[str, str], list[RunRow]], command: str | None, interval: dict[str, Any]) -> str:
    data = {"generated_by": command, "interval": interval, "families": FAMILIES,
            "collapse_criterion": COLLAPSE_CRITERION, "groups": [
                {"model": model, "dataset": dataset, "rows": [
                    {"editor": r.editor, "label": r.label, "batch_size": r.batch_size, "n_cases": r.summary.get("n_cases"),
                     "n_failed": r.summary.get("n_failed"), "counts": r.counts, "n_collapsed": r.n_collapsed,
                     "metrics": {c.name: c.aggregate(r) for c in metric_columns(rows) if c.aggregate(r)},
                     "logit_lens": r.summary.get("lens"),
                     "provenance": r.provenance()} for r in rows]}
                for (model, dataset), rows in groups.items()]}
    return json.dumps(data, indent=2) + "\n"


CSV_FIELDS = ["model", "dataset", "editor", "label", "batch_size", "n_cases", "n_failed", "n_collapsed", "family",
              "metric", "protocol", "comparable_group", "mean", "ci_low", "ci_high", "n", "run_id", "model_sha256",
              "dataset_sha256", "commit", "device"]


def to_csv(groups: dict[tuple[str, str], list[RunRow]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for (model, dataset), rows in groups.items():
        for row in rows:
            prov = row.provenance()
            for column in metric_columns(rows):
                agg = column.aggregate(row)
                if agg:
                    writer.writerow({"model": model, "dataset": dataset, "editor": row.editor, "label": row.label,
                                     "batch_size": row.batch_size, "n_cases": row.summary.get("n_cases"),
                                     "n_failed": row.summary.get("n_failed"), "n_collapsed": row.n_collapsed,
                                     "family": agg["family"], "metric": column.name, "protocol": agg.get("protocol"),
                                     "comparable_group": column.group, "mean": agg["mean"],
                                     "ci_low": agg["ci_low"], "ci_high": agg["ci_high"], "n": agg["n"],
                                     **{k: prov[k] for k in ("run_id", "model_sha256", "dataset_sha256", "commit",
                                                             "device")}})
    return buffer.getvalue()


# --- plots ------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.rstrip("/").split("/")[-1]).strip("_") or "x"


def _errors(aggs: list[dict[str, Any] | None]) -> list[list[float]]:
    """Asymmetric error-bar lengths (0 where a row has no interval)."""
    low = [a["mean"] - a["ci_low"] if a and a.get("ci_low") is not None else 0.0 for a in aggs]
    high = [a["ci_high"] - a["mean"] if a and a.get("ci_high") is not None else 0.0 for a in aggs]
    return [[max(v, 0.0) for v in low], [max(v, 0.0) for v in high]]


def plot_family_bars(rows: list[RunRow], family: str, title: str, path: Path) -> bool:
    """One panel per metric column (one protocol each); collapsed rows are red, hatched and labelled."""
    columns = [c for c in metric_columns(rows) if c.family == family]
    if not columns:
        return False
    ncols = min(4, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(2.9 * ncols, 3.0 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    labels = [f"{r.label} ({COLLAPSED_MARK.split()[-1]})" if r.n_collapsed else r.label for r in rows]
    colors = ["#C44E52" if r.n_collapsed else "#4C72B0" for r in rows]
    hatches = ["//" if r.n_collapsed else "" for r in rows]
    for ax, column in zip(axes.flat, columns):
        aggs = [column.aggregate(r) for r in rows]
        means = [a["mean"] if a and a.get("mean") is not None else 0.0 for a in aggs]
        bars = ax.bar(range(len(rows)), means, yerr=_errors(aggs), capsize=3, color=colors)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        if any(abs(m) >= 1e4 for m in means):
            ax.set_yscale("symlog")  # a collapsed row's ΔPPL is orders of magnitude above the rest
            ax.yaxis.get_major_locator().set_params(numticks=6)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(column.label, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
    save_figure(fig, path, suptitle=f"{FAMILIES[family]} · {title} (95% bootstrap CI)")
    return True


def plot_efficacy_vs_overlap(rows: list[RunRow], title: str, path: Path) -> bool:
    points = [r for r in rows if _mean(r, "efficacy_score") is not None and _mean(r, "circuit_edge_jaccard") is not None]
    if not points:
        return False
    fig, ax = pyplot().subplots(figsize=(4.8, 4.0))
    for row in points:
        x_agg, y_agg = row.metrics["circuit_edge_jaccard"], row.metrics["efficacy_score"]
        ax.errorbar([x_agg["mean"]], [y_agg["mean"]], xerr=_errors([x_agg]), yerr=_errors([y_agg]), fmt="o", capsize=3)
        ax.annotate(row.label, (x_agg["mean"], y_agg["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    save_figure(fig, path, ax=ax, xlabel="circuit overlap, pre vs post (edge Jaccard)", ylabel="efficacy score (ES)",
                title=f"Efficacy vs circuit overlap · {title}")
    return True


def plot_logit_lens(rows: list[RunRow], title: str, path: Path) -> bool:
    """Per layer, per editor: target_new's median rank (log scale) and mean probability, before the edit
    (dashed) and after it (solid)."""
    lensed = [row for row in rows if row.summary.get("lens")]
    if not lensed:
        return False
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for index, row in enumerate(lensed):
        lens, color = row.summary["lens"], f"C{index % 10}"
        layers = range(lens["n_layers"])
        for phase, style in (("pre", "--"), ("post", "-")):
            axes[0].plot(layers, lens[f"{phase}_new_rank_median"], style, color=color,
                         label=f"{row.label} ({phase})")
            axes[1].plot(layers, lens[f"{phase}_new_prob_mean"], style, color=color)
    axes[0].set_yscale("log")
    axes[0].axhline(TOP_K, color="grey", linewidth=0.6, linestyle=":")
    axes[0].set_ylabel("median rank of target_new")
    axes[1].set_ylabel("mean P(target_new)")
    for ax in axes:
        ax.set_xlabel("layer (residual stream after it, logit lens)")
    save_figure(fig, path, ax=axes[0], legend_size=7, suptitle=f"Logit lens of the rewrite prompt · {title}")
    return True


def read_curve(path: Path) -> list[dict[str, Any]]:
    points = [row for row in read_cases(path) if isinstance(row.get("n_edits"), (int, float))]
    return sorted(points, key=lambda p: p["n_edits"])


def plot_sequential(runs: list[RunRow], title: str, path: Path, include_partial: bool = False) -> bool:
    """One panel per curve field, one line per editor (its latest sequential run, as in the table)."""
    latest = {run.label: run for rows in latest_sequential(runs, include_partial).values() for run in rows}
    curves = {label: read_curve(run.path / "sequential.jsonl") for label, run in sorted(latest.items())}
    curves = {label: points for label, points in curves.items() if points}
    if not curves:
        return False
    colours = {label: f"C{i % 10}" for i, label in enumerate(curves)}  # one colour per editor in every panel
    fig, axes = pyplot().subplots(1, len(SEQUENTIAL_PANELS), figsize=(14, 3.4))
    for ax, (key, name) in zip(axes, SEQUENTIAL_PANELS):
        for label, points in curves.items():
            values = [(p["n_edits"], update_norm(p) if key == "update_norm" else p.get(key)) for p in points]
            xy = [(x, y) for x, y in values if isinstance(y, (int, float))]
            if xy:
                shown = f"{label} ({COLLAPSED_MARK.split()[-1]})" if curve_collapsed(points) else label
                ax.plot(*zip(*xy), marker="o", markersize=3, label=shown, color=colours[label],
                        linestyle="--" if curve_collapsed(points) else "-")
        ax.set_xlabel("edits so far")
        if key == "ppl":
            ax.set_yscale("log")  # a collapsing editor's perplexity is orders of magnitude above the rest
        elif key != "update_norm":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
    legend_ax = max(axes, key=lambda ax: len(ax.get_lines()))  # the panel where every editor has a line
    save_figure(fig, path, ax=legend_ax, legend_size=7, suptitle=f"Sequential editing · {title}")
    return True


def write_plots(runs: list[RunRow], groups: dict[tuple[str, str], list[RunRow]], folder: Path,
                include_partial: bool = False) -> list[tuple[tuple[str, str], Path]]:
    """Writes the PNGs; returns ((model, dataset), path) for each."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    keys = set(groups) | {(r.model, r.dataset) for r in runs if r.sequential}
    for model, dataset in sorted(keys):
        rows, stem, title = groups.get((model, dataset), []), f"{_slug(model)}__{_slug(dataset)}", f"{model} · {dataset}"
        for family in FAMILIES:
            path = folder / f"{stem}__{family}.png"
            if rows and plot_family_bars(rows, family, title, path):
                written.append(((model, dataset), path))
        path = folder / f"{stem}__efficacy_vs_circuit.png"
        if rows and plot_efficacy_vs_overlap(rows, title, path):
            written.append(((model, dataset), path))
        path = folder / f"{stem}__logit_lens.png"
        if rows and plot_logit_lens(rows, title, path):
            written.append(((model, dataset), path))
        path = folder / f"{stem}__sequential.png"
        same_group = [r for r in runs if (r.model, r.dataset) == (model, dataset)]
        if plot_sequential(same_group, title, path, include_partial):
            written.append(((model, dataset), path))
    return written


# --- the command ----------------------------------------------------------------------------

def leaderboard(runs_dir: Path, fmt: str = "md", command: str | None = None,
                charts: dict[tuple[str, str], list[str]] | None = None, include_partial: bool = False) -> str:
    runs = load_runs(runs_dir)
    groups = grouped(latest_rows(runs, include_partial))
    if fmt == "json":
        return to_json(groups, command, summarize([])["interval"])
    if fmt == "csv":
        return to_csv(groups)
    return to_markdown(groups, command, runs_dir, charts, latest_sequential(runs, include_partial))


def command_line(runs: str, output: str | None, fmt: str, plots: str | None, include_partial: bool = False) -> str:
    parts = ["python -m bench leaderboard", f"--runs {runs}"] + (["--include-partial"] if include_partial else [])
    if fmt != "md":
        parts.append(f"--format {fmt}")
    if output:
        parts.append(f"--output {output}")
    if plots:
        parts.append(f"--plots {plots}")
    return " ".join(parts)


def main(args: Any) -> int:
    """`python -m bench leaderboard [--runs DIR] [--format md|json|csv] [--output FILE] [--plots DIR]`."""
    runs_dir = Path(args.runs)
    if not runs_dir.is_dir():
        raise ValueError(f"runs folder '{runs_dir}' does not exist")
    _WARNED.clear()
    fmt = getattr(args, "format", "md") or "md"
    if fmt not in ("md", "json", "csv"):
        raise ValueError(f"unknown format '{fmt}'; valid: md, json, csv")
    plots = getattr(args, "plots", None)
    include_partial = bool(getattr(args, "include_partial", False))
    charts: dict[tuple[str, str], list[str]] = {}
    if plots:
        runs = load_runs(runs_dir)
        for key, path in write_plots(runs, grouped(latest_rows(runs, include_partial)), Path(plots),
                                     include_partial):
            print(f"wrote {path}")
            base = Path(args.output).resolve().parent if args.output else Path.cwd()
            charts.setdefault(key, []).append(os.path.relpath(path.resolve(), base))
    text = leaderboard(runs_dir, fmt, command_line(args.runs, args.output, fmt, plots, include_partial), charts,
                       include_partial)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0
