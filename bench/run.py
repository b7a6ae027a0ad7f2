"""One benchmark run: load model -> load cases -> pre-scores and circuit -> edit -> post-scores and circuit
-> restore -> append result -> aggregate."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.corrupt import circuit_batch
from bench.arch import parameter
from bench.data import EditCase, LoadedDataset, load_dataset, validate_case
from bench.models import ModelBundle, load_model
from bench.results import RunWriter
from bench.scoring import case_logprobs, counterfact_scores, drift_kl, neighborhood_next_token, top1_matches
from circuits.circuit import DEFAULT_TOP_N, Circuit, discover, overlap
from editors.base import Editor, get_editor, load_hparams

log = logging.getLogger("bench")


class RestoreError(RuntimeError):
    pass


@dataclass
class RunConfig:
    editor: str
    model: str = "smollm2-135m"
    dataset: str = "facts"
    n: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    output: str = "runs"
    hparams: str | None = None
    circuits: bool = True
    top_n: int = DEFAULT_TOP_N
    only_known: bool = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- weight backup and bitwise restore ------------------------------------------

def backup(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: parameter(model, name).detach().clone() for name in names}


@torch.no_grad()
def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        parameter(model, name).copy_(value)
    if not all(torch.equal(parameter(model, name), value) for name, value in saved.items()):
        raise RestoreError("weights differ from the backup after restore")


def all_finite(model: torch.nn.Module, names: list[str]) -> bool:
    return bool(torch.stack([torch.isfinite(parameter(model, n)).all() for n in names]).all())


# --- case selection ---------------------------------------------------------------

def select_cases(bundle: ModelBundle, data: LoadedDataset, n: int | None, only_known: bool
                 ) -> tuple[list[EditCase], dict[str, Any]]:
    """Valid cases, then (by default) those whose top-1 prediction is target_true, up to n."""
    counts: dict[str, Any] = {"loaded": len(data.cases) + len(data.rejected), "rejected": len(data.rejected),
                              "rejected_reasons": [f"{cid}: {why}" for cid, why in data.rejected][:50]}
    valid = []
    for case in data.cases:
        reason = validate_case(case)
        if reason:
            counts["rejected"] += 1
            counts["rejected_reasons"].append(f"{case.case_id}: {reason}")
        else:
            valid.append(case)
    valid = interleave_relations(valid)
    if not only_known:
        chosen = valid[:n] if n else valid
        counts.update(kept=len(chosen), unknown_skipped=0)
        return chosen, counts
    chosen, unknown, start = [], 0, 0
    while start < len(valid) and (n is None or len(chosen) < n):
        block = valid[start: start + 64]
        known = top1_matches(bundle.model, bundle.tokenizer, [c.rewrite_prompt for c in block],
                             [c.target_true for c in block], bundle.device)
        for case, ok in zip(block, known):
            if ok and (n is None or len(chosen) < n):
                chosen.append(case)
            elif not ok:
                unknown += 1
        start += len(block)
    counts.update(kept=len(chosen), unknown_skipped=unknown, scanned=start)
    return chosen, counts


def interleave_relations(cases: list[EditCase]) -> list[EditCase]:
    """Round-robin over relations (file order within each), so that --n N samples every relation."""
    groups: dict[str, list[EditCase]] = {}
    for case in cases:
        groups.setdefault(case.relation, []).append(case)
    queues = list(groups.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


# --- one case --------------------------------------------------------------------------

def find_circuit(bundle: ModelBundle, case: EditCase, answer: str, pool: list[str], cfg: RunConfig
                 ) -> tuple[Circuit | None, float]:
    batch = circuit_batch(bundle.tokenizer, case, answer, pool, bundle.device, cfg.seed)
    if batch is None:
        return None, 0.0
    start = time.perf_counter()
    circuit = discover(bundle.bridge(), bundle.model, bundle.arch, batch, answer, top_n=cfg.top_n)
    sync(bundle.device)
    return circuit, time.perf_counter() - start


def circuit_fields(pre: Circuit | None, post: Circuit | None, layers: list[int]) -> dict[str, Any]:
    if pre is None or post is None:
        return {"circuit_note": "no corrupted prompt of equal token length"}
    fields: dict[str, Any] = {f"circuit_{k}": v for k, v in overlap(pre, post).items()}
    fields["circuit_faithfulness_pre"] = pre.metrics.get("faithfulness")
    fields["circuit_faithfulness_post"] = post.metrics.get("faithfulness")
    fields["edit_layer_in_circuit"] = float(any(f"m{layer}" in post.nodes for layer in layers))
    return fields


def run_case(bundle: ModelBundle, editor: Editor, case: EditCase, pool: list[str], cfg: RunConfig,
             circuit_dir: Path) -> dict[str, Any]:
    model, tok, dev = bundle.model, bundle.tokenizer, bundle.device
    record: dict[str, Any] = {"case_id": case.case_id, "relation": case.relation, "subject": case.subject,
                              "target_true": case.target_true, "target_new": case.target_new}
    record["pre"] = counterfact_scores(case_logprobs(model, tok, case, dev))
    pre_next = neighborhood_next_token(model, tok, case, dev)
    pre_circuit, t_pre = find_circuit(bundle, case, case.target_true, pool, cfg) if cfg.circuits else (None, 0.0)

    names = editor.parameters_to_touch([case])
    saved = backup(model, names)
    try:
        start = time.perf_counter()
        outcome = editor.apply([case])
        sync(dev)
        record["seconds_edit"] = time.perf_counter() - start
        record["edit"] = {"layers": outcome.layers, **outcome.stats}
        if not all_finite(model, names):
            record.update(status="failed", reason="the edit produced NaN or inf weights")
            return record
        edited = editor.evaluation_case(case)
        record["post"] = counterfact_scores(case_logprobs(model, tok, edited, dev))
        record["drift_kl"] = drift_kl(pre_next, neighborhood_next_token(model, tok, edited, dev))
        if cfg.circuits:
            post_circuit, t_post = find_circuit(bundle, edited, case.target_new, pool, cfg)
            record.update(circuit_fields(pre_circuit, post_circuit, outcome.layers))
            record["seconds_circuit"] = (t_pre + t_post) / 2
            _save_circuits(circuit_dir, case.case_id, pre_circuit, post_circuit)
        record["status"] = "ok"
        return record
    finally:
        restore(model, saved)
        editor.undo()


def _save_circuits(folder: Path, case_id: str, pre: Circuit | None, post: Circuit | None) -> None:
    folder.mkdir(exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(case_id))
    for tag, circuit in (("pre", pre), ("post", post)):
        if circuit is not None:
            circuit.save(folder / f"{safe}.{tag}.json")


# --- the run ---------------------------------------------------------------------------

def run_id(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    model = cfg.model.rstrip("/").split("/")[-1]
    dataset = Path(cfg.dataset).stem if "/" in cfg.dataset or cfg.dataset.endswith(".json") else cfg.dataset
    return f"{stamp}-{cfg.editor}-{model}-{dataset}"


def run(cfg: RunConfig) -> tuple[Path, dict[str, Any]]:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    editor_cls = get_editor(cfg.editor)
    data = load_dataset(cfg.dataset)
    log.info("loading: model %s on %s", cfg.model, cfg.device)
    bundle = load_model(cfg.model, cfg.device, cfg.dtype)
    hparams, hparams_path = load_hparams(cfg.editor, cfg.model, bundle.arch.family, cfg.hparams)
    editor = editor_cls(bundle, hparams)
    cases, counts = select_cases(bundle, data, cfg.n, cfg.only_known)
    log.info("loading: %d cases kept (%d rejected, %d not known to the model)", counts["kept"], counts["rejected"],
             counts["unknown_skipped"])
    manifest = {"editor": cfg.editor, "hparams": hparams, "hparams_file": hparams_path, "seed": cfg.seed,
                "model": bundle.provenance, "device": str(bundle.device),
                "dataset": {"name": data.name, "path": data.path, "sha256": data.sha256},
                "cases": counts, "circuits": {"enabled": cfg.circuits, "method": "eap", "top_n": cfg.top_n,
                                              "metric": "log-prob of the answer's first token"},
                "config": vars(cfg)}
    writer = RunWriter(Path(cfg.output) / run_id(cfg), manifest)
    pool = sorted({c.subject for c in data.cases})
    status = "complete"
    log.info("editing: %s on %d cases%s", cfg.editor, len(cases),
             f", with pre/post circuits (EAP, top {cfg.top_n} edges)" if cfg.circuits else "")
    try:
        for case in tqdm(cases, desc=f"{cfg.editor} edits", unit="case"):
            writer.append(_safe_case(bundle, editor, case, pool, cfg, writer.dir / "circuits"))
    except KeyboardInterrupt:
        status = "interrupted"
        log.warning("interrupted: the summary covers the %s cases already written", "completed")
    log.info("scoring: aggregating %s", writer.cases_path)
    summary = writer.finish({"seed": cfg.seed, "device": str(bundle.device), "top_n": cfg.top_n}, status)
    return writer.dir, summary


def _safe_case(bundle: ModelBundle, editor: Editor, case: EditCase, pool: list[str], cfg: RunConfig,
               circuit_dir: Path) -> dict[str, Any]:
    """Runs one case; an exception inside the editor fails that case only (weights are restored)."""
    try:
        record = run_case(bundle, editor, case, pool, cfg, circuit_dir)
    except RestoreError:
        raise
    except (RuntimeError, ValueError, FloatingPointError) as exc:
        record = {"case_id": case.case_id, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    if record.get("status") == "failed":
        log.warning("case %s failed: %s", case.case_id, record.get("reason"))
    for key, value in list(record.items()):
        if isinstance(value, float) and not math.isfinite(value):
            record[key] = None
    return record
