"""Run folders: manifest with provenance, append-only per-case JSONL, and the summary."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.scoring import harmonic_mean

SUMMARY_MEANS = {
    "efficacy_score": "efficacy_score",
    "paraphrase_score": "paraphrase_score",
    "neighborhood_score": "neighborhood_score",
    "efficacy_magnitude": "efficacy_magnitude",
    "paraphrase_magnitude": "paraphrase_magnitude",
    "neighborhood_magnitude": "neighborhood_magnitude",
    "drift_kl": "drift_kl",
    "circuit_edge_jaccard": "circuit_edge_jaccard",
    "circuit_node_jaccard": "circuit_node_jaccard",
    "circuit_faithfulness_pre": "circuit_faithfulness_pre",
    "circuit_faithfulness_post": "circuit_faithfulness_post",
    "edit_layer_in_circuit": "edit_layer_in_circuit",
    "seconds_per_edit": "seconds_edit",
    "seconds_per_circuit": "seconds_circuit",
}


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


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    done = [c for c in cases if c.get("status") == "ok"]
    out: dict[str, Any] = {"n_cases": len(done), "n_failed": sum(c.get("status") == "failed" for c in cases)}
    for key, field in SUMMARY_MEANS.items():
        out[key] = _mean([c.get("post", {}).get(field, c.get(field)) for c in done])
    parts = [out["efficacy_score"], out["paraphrase_score"], out["neighborhood_score"]]
    out["score"] = harmonic_mean(parts) if all(p is not None for p in parts) else None
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
