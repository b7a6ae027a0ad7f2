"""Resuming a killed or interrupted run: `python -m bench run --resume RUN_DIR`.

The run folder's manifest holds the configuration, the resolved hyperparameters, the model and dataset
checksums, the selected case ids and the code version. A resume recomputes each of them and refuses,
with one line, when any differs. Cases already in cases.jsonl are not run again (a torn last line, a
case cut off by the kill, is reported and dropped); sequential runs continue from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.results import code_sha256, drop_torn_tail, read_case_lines, run_lock
from lmview.io import read_mapping

if TYPE_CHECKING:
    from editors.base import Editor
    from lmview.case import EditCase

log = logging.getLogger("bench")

CHECKPOINT = "checkpoint.pt"
RESUMABLE = ("running", "interrupted")


def stored_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"cannot resume {run_dir}: it has no manifest.json (not a run folder)")
    prefix = f"cannot resume {run_dir}: manifest.json"
    manifest = read_mapping(path, lambda reason: ValueError(f"{prefix} is not valid JSON ({reason})"),
                            lambda _: ValueError(f"{prefix} has no run configuration"))
    if not isinstance(manifest.get("config"), dict):
        raise ValueError(f"{prefix} has no run configuration")
    return manifest


def check_resumable(run_dir: Path, manifest: dict[str, Any]) -> None:
    status = manifest.get("status")
    if status == "complete":
        raise ValueError(f"cannot resume {run_dir}: the run is already complete")
    if status not in RESUMABLE:
        raise ValueError(f"cannot resume {run_dir}: its state is {status!r} ({manifest.get('error', 'no error recorded')}); "
                         f"start a new run")
    with run_lock(Path(run_dir)):
        pass  # raises when another process still holds the run
    cases = Path(run_dir) / "cases.jsonl"
    if not cases.is_file():
        raise ValueError(f"cannot resume {run_dir}: it has no cases.jsonl")
    lines = read_case_lines(cases)
    if lines.bad:
        raise ValueError(f"cannot resume {run_dir}: cases.jsonl {lines.bad[0]}; the folder is damaged")
    torn = drop_torn_tail(cases)
    if torn:
        log.warning("resume: %s: %s, a case cut off by the interruption; dropped, it runs again", cases, torn)


def config_differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the run's manifest and the resumed configuration, one phrase each."""
    checks = [
        ("editor", stored.get("editor"), now.get("editor")),
        ("resolved hyperparameters", stored.get("hparams"), now.get("hparams")),
        ("model checksum", (stored.get("model") or {}).get("sha256"), (now.get("model") or {}).get("sha256")),
        ("dataset checksum", (stored.get("dataset") or {}).get("sha256"), (now.get("dataset") or {}).get("sha256")),
        ("seed", stored.get("seed"), now.get("seed")),
        ("mode", stored.get("mode"), now.get("mode")),
        ("code version (sha256 of lmview/, bench/, editors/, circuits/)", stored.get("code_sha256"), code_sha256()),
        ("selected cases", stored.get("case_ids"), now.get("case_ids")),
    ]
    config_now = {k: v for k, v in (now.get("config") or {}).items() if k != "output"}
    config_then = {k: v for k, v in (stored.get("config") or {}).items() if k != "output"}
    checks.append(("configuration", config_then, config_now))
    return [f"the {name} changed ({_first_difference(then, current)})" for name, then, current in checks
            if _canonical(then) != _canonical(current)]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _first_difference(then: Any, now: Any) -> str:
    if isinstance(then, dict) and isinstance(now, dict):
        for key in sorted(set(then) | set(now), key=str):
            if _canonical(then.get(key)) != _canonical(now.get(key)):
                return f"{key}: {_short(then.get(key))} in the run, {_short(now.get(key))} now"
    return f"{_short(then)} in the run, {_short(now)} now"


def _short(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- sequential checkpoints -----------------------------------------------------------------------

@dataclass
class SequentialState:
    """Where a sequential run continues: the originals of the tensors edited so far, the cases seen,
    the curve points written and the number of batches done."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: list[tuple[EditCase, bool]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    batches_done: int = 0


def keeps_state_outside_weights(editor: Editor) -> bool:
    from editors.base import Editor

    return type(editor).undo is not Editor.undo


def save_checkpoint(run_dir: Path, model: torch.nn.Module, editor: Editor, originals: dict[str, torch.Tensor],
                    seen: list[tuple[EditCase, bool]], points: list[dict[str, Any]], batches_done: int) -> None:
    """The edited values of every tensor edited so far, and how far the run got (written atomically)."""
    if keeps_state_outside_weights(editor):
        return
    from lmview.arch import parameter

    state = {"tensors": {name: parameter(model, name).detach().cpu().clone() for name in originals},
             "seen": [[case.case_id, ok] for case, ok in seen], "n_points": len(points),
             "batches_done": batches_done}
    tmp = run_dir / f"{CHECKPOINT}.{os.getpid()}.part"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


def resume_sequential(run_dir: Path, model: torch.nn.Module, editor: Editor,
                      cases: dict[str, EditCase]) -> SequentialState:
    """Loads the last checkpoint into the model (keeping the originals for the final restore) and cuts
    cases.jsonl and sequential.jsonl back to it; with no checkpoint, the run starts from its first case."""
    from lmview.arch import backup, parameter

    path = run_dir / CHECKPOINT
    cases_path, curve_path = run_dir / "cases.jsonl", run_dir / "sequential.jsonl"
    state = SequentialState()
    if path.exists() and not keeps_state_outside_weights(editor):
        saved = torch.load(path, map_location="cpu")
        state.originals = backup(model, list(saved["tensors"]))
        with torch.no_grad():
            for name, value in saved["tensors"].items():
                parameter(model, name).copy_(value)
        state.seen = [(cases[cid], bool(ok)) for cid, ok in saved["seen"]]
        state.batches_done = int(saved["batches_done"])
        n_records, n_points = len(state.seen), int(saved["n_points"])
        log.info("resume: continuing the sequential run after %d cases (its last checkpoint)", n_records)
    else:
        if cases_path.exists() and cases_path.stat().st_size:
            log.warning("resume: %s has no checkpoint of its edited weights%s; the sequential run starts again "
                        "from its first case", run_dir, " (the editor keeps state outside the weights)"
                        if keeps_state_outside_weights(editor) else "")
        n_records = n_points = 0
    _keep_lines(cases_path, n_records)
    _keep_lines(curve_path, n_points)
    state.points = [json.loads(line) for line in curve_path.read_text().splitlines()[:n_points]]
    return state


def _keep_lines(path: Path, n: int) -> None:
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    path.write_text("".join(lines[:n]))
