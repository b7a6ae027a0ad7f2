"""The leaderboard: the latest run per (editor, model, dataset), rendered with tabulate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

COLUMNS = [
    ("editor", "Editor"), ("model", "Model"), ("dataset", "Dataset"), ("n_cases", "N"),
    ("efficacy_score", "ES"), ("paraphrase_score", "PS"), ("neighborhood_score", "NS"), ("score", "S"),
    ("efficacy_magnitude", "EM"), ("drift_kl", "Drift KL"), ("circuit_edge_jaccard", "Edge J"),
    ("circuit_node_jaccard", "Node J"), ("circuit_faithfulness_pre", "Faith pre"),
    ("circuit_faithfulness_post", "Faith post"), ("edit_layer_in_circuit", "Layer in circuit"),
    ("seconds_per_edit", "s/edit"),
]


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Summaries of finished runs, each with its manifest's end time and run id."""
    rows = []
    for summary_path in sorted(runs_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        manifest_path = summary_path.with_name("manifest.json")
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        summary["finished"] = manifest.get("finished", "")
        summary["run_id"] = summary_path.parent.name
        rows.append(summary)
    return rows


def latest_per_group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["finished"], r["run_id"])):
        latest[(row["editor"], row["model"], row["dataset"])] = row
    return sorted(latest.values(), key=lambda r: (r["model"], r["dataset"], -(r.get("score") or 0.0)))


def _cell(value: Any) -> Any:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}"
    return value


def render(rows: list[dict[str, Any]]) -> str:
    table = [[_cell(row.get(key)) for key, _ in COLUMNS] for row in rows]
    return tabulate(table, headers=[title for _, title in COLUMNS], tablefmt="github")


def leaderboard(runs_dir: Path) -> str:
    return render(latest_per_group(load_runs(runs_dir)))
