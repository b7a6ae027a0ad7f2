"""One benchmark run: load model -> load cases -> pre-scores and circuit -> edit -> post-scores and circuit
-> restore -> append result -> aggregate.

Modes: one case at a time (default); `batch_size` K > 1 (pre-scores of K cases, their edits, their
post-scores, one restore); `sequential` (edits accumulate, a lifelong-editing curve every `eval_every`
edits in sequential.jsonl, one bitwise-checked restore at the end).
"""

from __future__ import annotations

import logging
import math
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from bench.corrupt import CorruptionPool, answer_check, prompt_pairs, prompt_sets
from bench.data import load_dataset
from bench.data.records import LoadedDataset
from bench.integrity import IntegrityError, ModelGuard
from bench.lens import case_lens
from bench.signals import interrupts_deferred, raise_if_stopped, signal_name
from bench.metrics import GENERATION_MAX_NEW_TOKENS, easyedit_scores, generation_metrics
from bench.perplexity import heldout_texts, overlaps_keystats, wiki_perplexity
from bench.relation_circuits import relation_circuits_for
from bench.results import COLLAPSE_CRITERION, RunWriter, ppl_collapsed, read_cases
from bench.scoring import (case_target_nll, counterfact_scores, drift_kl, harmonic_mean, neighborhood_next_token,
                           top1_matches)
from circuits.activations import PairBatch
from circuits.circuit import DEFAULT_TOP_N, Circuit, discover, evaluate_circuit, mlp_rank_and_share, overlap
from circuits.curve import reported_faithfulness
from circuits.graph import DEFAULT_GRAPH, Graph
from editors.base import EditOutcome, Editor, get_editor, load_hparams
from lmview.arch import backup, parameter
from lmview.cache import FetchError
from lmview.case import DatasetError, EditCase, validate_case
from lmview.corpus import DEFAULT_CORPUS, CorpusError, wiki_texts
from lmview.io import append_jsonl, safe_filename
from lmview.models import ModelBundle, load_model
from lmview.paths import REPO_ROOT

log = logging.getLogger("bench")


class RestoreError(IntegrityError):
    pass


class SystematicFailure(RuntimeError):
    """The first cases of a run all failed: the cause is the setup, not the cases."""


SYSTEMATIC_FAILURES = 5  # the run stops when its first this-many cases all failed
CIRCUITS_DIR = str(REPO_ROOT / "circuits")


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
    generation: bool = True  # the free-generation family (greedy continuations): most of a case's CPU scoring time
    top_n: int = DEFAULT_TOP_N
    graph: str = DEFAULT_GRAPH  # circuit graph: "ungrouped" (EAP-IG/MIB) or "grouped" k/v receivers
    ablation: str = "corrupted"  # circuits: corrupted | zero | mean
    metric: str = "logprob"  # circuits: logprob | logit-diff | match-nll
    save_scores: bool = False  # every edge's score beside the pre/post circuits (for bench circuit-export)
    only_known: bool = False  # the harness's known-fact filter (--known-only); protocols edit every record
    relation_circuits: bool = False  # also the case's relation circuit before/after the edit (bench/relation_circuits.py)
    batch_size: int = 1  # cases per apply (batched editors) or per restore (the others)
    sequential: bool = False  # edits accumulate over the run; restored once at the end
    eval_every: int = 5  # sequential: a curve point after every eval_every edits
    eval_sample: int = 0  # sequential: each curve point re-scores this fixed seeded sample of the cases (0: all)
    ppl_texts: int = 8  # held-out Wikipedia texts for per-case ppl_pre/ppl_post (0: off)
    curve_ppl_texts: int = 32  # held-out Wikipedia texts for each sequential curve point


def resume_config(run_dir: Path, given: dict[str, Any]) -> RunConfig:
    """The run's configuration from its manifest; `given` (options set on the command line) must agree."""
    from bench.resume import stored_manifest

    stored = stored_manifest(run_dir)["config"]
    names = {f.name for f in fields(RunConfig)}
    config = {k: v for k, v in stored.items() if k in names}
    for key, value in given.items():
        if key in names and key != "output" and config.get(key) != value:
            raise ValueError(f"cannot resume {run_dir}: --{key.replace('_', '-')} {value} differs from the run's "
                             f"{config.get(key)!r}")
    return RunConfig(**config)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- weight backup and bitwise restore ------------------------------------------

@torch.no_grad()
def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        parameter(model, name).copy_(value)
    if not all(torch.equal(parameter(model, name), value) for name, value in saved.items()):
        raise RestoreError("weights differ from the backup after restore")


def all_finite(model: torch.nn.Module, names: list[str]) -> bool:
    if not names:  # editors that change no parameters (grace, ike)
        return True
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


def selection_counts(counts: dict[str, Any], only_known: bool) -> dict[str, Any]:
    """The summary's record counts before editing (n_cases and n_failed come from the cases)."""
    return {"case_selection": "known-only" if only_known else "every valid record",
            "n_loaded": counts["loaded"], "n_rejected": counts["rejected"],
            "n_unknown_skipped": counts["unknown_skipped"], "n_selected": counts["kept"]}


def interleave_relations(cases: list[EditCase]) -> list[EditCase]:
    """Round-robin over relations (file order within each), so that --n N samples every relation."""
    groups: dict[str, list[EditCase]] = {}
    for case in cases:
        groups.setdefault(case.relation, []).append(case)
    queues = list(groups.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


# --- one case, one batch ---------------------------------------------------------------

Pool = CorruptionPool | list[str]


def find_circuit(bundle: ModelBundle, batch: PairBatch | None, answer: str, cfg: RunConfig, evaluate: bool = True
                 ) -> tuple[Circuit | None, float]:
    """The circuit of `answer` on the batch's prompt pairs (current weights), and its seconds."""
    if batch is None:
        return None, 0.0
    start = time.perf_counter()
    circuit = discover(bundle.bridge(), bundle.model, bundle.arch, batch, answer, top_n=cfg.top_n,
                       graph=cfg.graph, ablation=cfg.ablation, metric=cfg.metric, evaluate=evaluate)
    sync(bundle.device)
    return circuit, time.perf_counter() - start


@dataclass
class CaseCircuits:
    """One case's circuits on one set of weights. `main` is built from prompt set A; on the pre-edit weights
    `floor` is built from the disjoint set B (noise floor); on the edited weights `old_answer` is the circuit
    for target_true on set A (the changed-answer control). `held_out` is `main` evaluated on set B."""

    main: Circuit | None = None
    floor: Circuit | None = None
    old_answer: Circuit | None = None
    held_out: dict[str, float] = field(default_factory=dict)
    swapped: list[str | None] = field(default_factory=list)  # set A's corrupting subjects, kept for after the edit
    seconds: float = 0.0
    note: str | None = None


def case_circuits(bundle: ModelBundle, case: EditCase, answer: str, pool: Pool, cfg: RunConfig,
                  edited: bool, prefer: list[str | None] | None = None) -> CaseCircuits:
    """Before the edit (edited=False): main and floor circuits for target_true. After it: main for target_new
    and the old-answer control. Corrupted prompts never share target_true or target_new, by the data and by
    the model on the current weights (bench/corrupt.py); after the edit set A tries the pre-edit partners first."""
    tok, dev = bundle.tokenizer, bundle.device
    set_a, set_b = prompt_sets(case)
    accept = answer_check(bundle.model, tok, (case.target_true, case.target_new), dev)
    pairs_a = prompt_pairs(tok, case, set_a, pool, cfg.seed, accept=accept, prefer=prefer or [])
    pairs_b = prompt_pairs(tok, case, set_b, pool, cfg.seed, tag=":B", accept=accept, avoid=pairs_a.used)
    batch_a, batch_b = pairs_a.batch(tok, answer, dev), pairs_b.batch(tok, answer, dev)
    out = CaseCircuits(swapped=pairs_a.swapped)
    if batch_a is None:
        out.note = "no corrupted prompt of equal token length whose answer differs from both targets"
        return out
    out.main, out.seconds = find_circuit(bundle, batch_a, answer, cfg)
    if batch_b is not None:
        out.held_out = evaluate_circuit(bundle.bridge(), bundle.model, bundle.arch, out.main, batch_b)
        if not edited:
            out.floor, _ = find_circuit(bundle, batch_b, answer, cfg, evaluate=False)
    if edited:
        out.old_answer, _ = find_circuit(bundle, pairs_a.batch(tok, case.target_true, dev), case.target_true, cfg,
                                         evaluate=False)
    return out


def _beyond(floor: float | None, value: float | None) -> float | None:
    return None if floor is None or value is None else floor - value


def circuit_fields(pre: CaseCircuits | None, post: CaseCircuits | None, layers: list[int]) -> dict[str, Any]:
    """Per-case circuit columns (docs/circuits.md): overlaps with their noise floor, the changed-answer control,
    in- and out-of-sample faithfulness (None when clean and ablated nearly coincide), the edited MLP's rank
    and share among the circuit's nodes."""
    if pre is None or post is None or pre.main is None or post.main is None:
        note = (pre.note if pre is not None else None) or (post.note if post is not None else None)
        return {"circuit_note": note or "no circuit"}
    fields: dict[str, Any] = {f"circuit_{k}": v for k, v in overlap(pre.main, post.main).items()}
    fields["circuit_graph"] = pre.main.graph
    if pre.floor is not None:
        floor = overlap(pre.main, pre.floor)
        fields["circuit_edge_jaccard_floor"] = floor["edge_jaccard"]
        fields["circuit_node_jaccard_floor"] = floor["node_jaccard"]
    if post.old_answer is not None:
        control = overlap(pre.main, post.old_answer)
        fields["circuit_edge_jaccard_old_answer"] = control["edge_jaccard"]
        fields["circuit_node_jaccard_old_answer"] = control["node_jaccard"]
    floor_e = fields.get("circuit_edge_jaccard_floor")
    fields["circuit_edge_jaccard_beyond_floor"] = _beyond(floor_e, fields["circuit_edge_jaccard"])
    fields["circuit_node_jaccard_beyond_floor"] = _beyond(fields.get("circuit_node_jaccard_floor"),
                                                          fields["circuit_node_jaccard"])
    fields["circuit_old_answer_beyond_floor"] = _beyond(floor_e, fields.get("circuit_edge_jaccard_old_answer"))
    fields["circuit_faithfulness_pre"] = reported_faithfulness(pre.main.metrics)
    fields["circuit_faithfulness_post"] = reported_faithfulness(post.main.metrics)
    fields["circuit_faithfulness_oos_pre"] = reported_faithfulness(pre.held_out)
    fields["circuit_faithfulness_oos_post"] = reported_faithfulness(post.held_out)
    for tag, circuit in (("pre", pre.main), ("post", post.main)):
        rank, share = mlp_rank_and_share(circuit, layers)
        fields[f"circuit_mlp_rank_{tag}"] = rank
        fields[f"circuit_mlp_share_{tag}"] = share
        fields[f"circuit_mlp_in_circuit_{tag}"] = float(rank is not None)
        fields[f"circuit_n_nodes_{tag}"] = len(circuit.nodes)
    return fields


@dataclass
class CaseBefore:
    """What is measured on one case before its batch is edited."""

    record: dict[str, Any]
    pre_next: torch.Tensor  # next-token log-probs on the neighbourhood prompts
    circuits: CaseCircuits | None
    locality_tokens: list[list[int]] | None = None  # pre-edit argmax tokens for EasyEdit locality


def lens_of(bundle: ModelBundle, case: EditCase, shown: EditCase) -> dict[str, Any]:
    """The logit lens (bench/lens.py) of the prompt the model is scored on (`shown`: the editor's evaluation
    case, e.g. IKE's with demonstrations) for the case's two targets."""
    return case_lens(bundle.model, bundle.arch, bundle.tokenizer, shown.rewrite_prompt, case.subject,
                     case.target_true, case.target_new)


def measure_before(bundle: ModelBundle, case: EditCase, pool: Pool, cfg: RunConfig) -> CaseBefore:
    model, tok, dev = bundle.model, bundle.tokenizer, bundle.device
    record: dict[str, Any] = {"case_id": case.case_id, "relation": case.relation, "subject": case.subject,
                              "target_true": case.target_true, "target_new": case.target_new}
    record["pre"] = counterfact_scores(case_target_nll(model, tok, case, dev))
    record["scoring"] = case.scoring  # the dataset's primary family: "counterfact" (pre/post) or "zsre" (easyedit)
    record["pre_easyedit"], locality_tokens = easyedit_scores(model, tok, case, dev)
    pre_next = neighborhood_next_token(model, tok, case, dev)
    record["lens_pre"] = lens_of(bundle, case, case)
    circuits = case_circuits(bundle, case, case.target_true, pool, cfg, edited=False) if cfg.circuits else None
    if cfg.relation_circuits:  # once per relation per run, on the pre-edit weights
        relation_circuits_for(bundle, cfg).before_edit(case.relation)
    return CaseBefore(record, pre_next, circuits, locality_tokens)


def measure_after(bundle: ModelBundle, editor: Editor, case: EditCase, before: CaseBefore, layers: list[int],
                  pool: Pool, cfg: RunConfig, circuit_dir: Path) -> dict[str, Any]:
    model, tok, dev = bundle.model, bundle.tokenizer, bundle.device
    record, pre_next, pre = before.record, before.pre_next, before.circuits
    edited = editor.evaluation_case(case)
    record["post"] = counterfact_scores(case_target_nll(model, tok, edited, dev))
    record["post_easyedit"], _ = easyedit_scores(model, tok, edited, dev, before.locality_tokens)
    if cfg.generation:
        record["post_generation"], record["post_generation_text"] = generation_metrics(model, tok, edited, dev)
    record["drift_kl"] = drift_kl(pre_next, neighborhood_next_token(model, tok, edited, dev))
    record["lens_post"] = lens_of(bundle, case, edited)
    if cfg.circuits and pre is not None:
        same_prompts = edited.rewrite_prompt == case.rewrite_prompt and edited.paraphrases == case.paraphrases
        post = case_circuits(bundle, edited, case.target_new, pool, cfg, edited=True,
                             prefer=pre.swapped if same_prompts else None)
        record.update(circuit_fields(pre, post, layers))
        record["seconds_circuit"] = (pre.seconds + post.seconds) / 2
        _save_circuits(circuit_dir, case.case_id, {"pre": pre.main, "pre-floor": pre.floor, "post": post.main,
                                                   "post-old-answer": post.old_answer}, cfg.save_scores)
    if cfg.relation_circuits:
        record.update(relation_circuits_for(bundle, cfg).after_edit(case.relation, case.subject, circuit_dir,
                                                                    case.case_id))
    record["status"] = "ok"
    return record


def apply_edits(editor: Editor, cases: list[EditCase]) -> list[tuple[EditOutcome, float]]:
    """(outcome, seconds) per case: a batched editor gets one apply() for the whole batch (its time is
    split evenly); any other editor one apply() per case, in order, with no restore in between."""
    dev = editor.bundle.device
    if editor.batched:
        start = time.perf_counter()
        outcome = editor.apply(list(cases))
        sync(dev)
        return [(outcome, (time.perf_counter() - start) / len(cases))] * len(cases)
    timed = []
    for case in cases:
        start = time.perf_counter()
        outcome = editor.apply([case])
        sync(dev)
        timed.append((outcome, time.perf_counter() - start))
    return timed


def touched_parameters(editor: Editor, cases: list[EditCase]) -> list[str]:
    """Every tensor the batch's apply() call(s) may modify."""
    names = list(editor.parameters_to_touch(list(cases)))
    for case in cases:
        names += editor.parameters_to_touch([case])
    return list(dict.fromkeys(names))


@lru_cache(maxsize=4)
def heldout_for_ppl(n: int) -> tuple[str, ...] | None:
    """The last n Wikipedia texts, or None (with a warning) when n is 0 or the corpus cannot be fetched."""
    if n <= 0:
        return None
    try:
        return tuple(heldout_texts(n))
    except (CorpusError, FetchError) as exc:
        log.warning("perplexity: no held-out Wikipedia texts (%s); ppl fields will be missing", exc)
        return None


def held_out_perplexity(bundle: ModelBundle, texts: tuple[str, ...] | None) -> float | None:
    return None if texts is None else wiki_perplexity(bundle.model, bundle.tokenizer, bundle.device, list(texts))


def run_batch(bundle: ModelBundle, editor: Editor, cases: list[EditCase], pool: Pool, cfg: RunConfig,
              circuit_dir: Path, batch_index: int = 0, keep_edits: bool = False,
              ppl_pre: float | None = None) -> list[dict[str, Any]]:
    """Pre-scores of every case, the batch's edits, post-scores of every case, one record per case.

    ppl_pre: the held-out perplexity of the unedited weights, when the caller already has it.

    Afterwards the weights are restored bitwise to their values before the batch and editor.undo() runs,
    unless keep_edits (sequential mode): then they are restored only when the batch failed, and undo()
    is left to the end of the run.
    """
    model = bundle.model
    with case_phase("score"):
        befores = [measure_before(bundle, case, pool, cfg) for case in cases]
        records = [dict(before.record, batch_index=batch_index) for before in befores]
        for before, record in zip(befores, records):
            before.record = record
        held_out = None if keep_edits else heldout_for_ppl(cfg.ppl_texts)
        if ppl_pre is None:
            ppl_pre = held_out_perplexity(bundle, held_out)
    with case_phase("edit"):
        names = touched_parameters(editor, cases)
        saved = backup(model, names)
    failed = True
    try:
        with case_phase("edit"):
            for record, (outcome, seconds) in zip(records, apply_edits(editor, cases)):
                record["seconds_edit"] = seconds
                record["edit"] = {"layers": outcome.layers, **outcome.stats}
        if not all_finite(model, names):
            for record in records:
                record.update(status="failed", reason="the edit produced NaN or inf weights", phase="edit",
                              error={"type": "NonFiniteWeights", "message": "the edit produced NaN or inf weights"})
            return records
        with case_phase("score"):
            ppl_post = held_out_perplexity(bundle, held_out)
            records = [measure_after(bundle, editor, case, before, before.record["edit"]["layers"], pool, cfg,
                                     circuit_dir) for case, before in zip(cases, befores)]
        if held_out is not None:
            for record in records:
                record.update(ppl_pre=ppl_pre, ppl_post=ppl_post)
        failed = False
        return records
    finally:
        with case_phase("restore"):
            if not keep_edits:
                restore(model, saved)
                editor.undo()
            elif failed:
                restore(model, saved)  # roll back this batch only; the earlier edits stay


def run_case(bundle: ModelBundle, editor: Editor, case: EditCase, pool: Pool, cfg: RunConfig,
             circuit_dir: Path) -> dict[str, Any]:
    """One case: a batch of one, restored afterwards."""
    return run_batch(bundle, editor, [case], pool, cfg, circuit_dir)[0]


def _save_circuits(folder: Path, case_id: str, circuits: dict[str, Circuit | None], with_scores: bool = False
                   ) -> None:
    """<case>.pre.json, <case>.post.json and the noise-floor and old-answer circuits beside them; with_scores
    also every edge's score of the pre and post circuits (<case>.pre.scores.pt, <case>.post.scores.pt)."""
    folder.mkdir(exist_ok=True)
    safe = safe_filename(case_id)
    for tag, circuit in circuits.items():
        if circuit is not None:
            circuit.save(folder / f"{safe}.{tag}.json", with_scores=with_scores and tag in ("pre", "post"))


# --- sequential (lifelong) editing ---------------------------------------------------------------

def layer_of(name: str) -> int | None:
    """The block index in a parameter name (model.layers.4.mlp.down_proj.weight -> 4), None outside blocks."""
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


@torch.no_grad()
def weight_norms(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """For every tensor edited so far, in layer order: its layer, ||W_t - W_0|| and ||W_t|| (Frobenius,
    float32), and ||W_0||."""
    rows = []
    for name, start in originals.items():
        now = parameter(model, name).detach().float()
        rows.append({"tensor": name, "layer": layer_of(name), "delta_norm": float((now - start.float()).norm()),
                     "norm": float(now.norm()), "norm_0": float(start.float().norm())})
    return sorted(rows, key=lambda r: (r["layer"] is None, r["layer"] or 0, r["tensor"]))


def curve_sample(cases: list[EditCase], size: int, seed: int) -> frozenset[str] | None:
    """The case ids a curve point re-scores: `size` of the run's cases drawn once with the seed (every point
    scores those of them edited so far), or None (size 0, or not fewer than the cases) for every case."""
    if size <= 0 or size >= len(cases):
        return None
    return frozenset(c.case_id for c in random.Random(seed).sample(cases, size))


CURVE_SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")


@torch.no_grad()
def unedited_scores(bundle: ModelBundle, cases: list[EditCase], sample: frozenset[str] | None
                    ) -> dict[str, dict[str, float]]:
    """ES, PS and NS of each case a curve will re-score (the sample, or every case) on the unedited weights,
    for the curve's unedited reference; the plain case, as the model sees it before any edit."""
    model, tok, dev = bundle.model, bundle.tokenizer, bundle.device
    out = {}
    for case in cases:
        if sample is None or case.case_id in sample:
            scores = counterfact_scores(case_target_nll(model, tok, case, dev))
            out[case.case_id] = {k: scores[k] for k in CURVE_SCORES if scores.get(k) is not None}
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def curve_scores(kept: list[dict[str, Any]], scored: list[dict[str, Any]]) -> dict[str, float | None]:
    """A curve point's ES and PS (over the cases whose edit is in the model), NS (over every scored case)
    and their harmonic mean S."""
    out = {"efficacy": _mean(kept, "efficacy_score"), "paraphrase": _mean(kept, "paraphrase_score"),
           "neighborhood": _mean(scored, "neighborhood_score")}
    parts = list(out.values())
    out["score"] = harmonic_mean(parts) if all(p is not None for p in parts) else None
    return out


@torch.no_grad()
def curve_point(bundle: ModelBundle, editor: Editor, seen: list[tuple[EditCase, bool]],
                texts: tuple[str, ...] | None, started: float, originals: dict[str, torch.Tensor] | None = None,
                ppl_base: float | None = None, sample: frozenset[str] | None = None,
                unedited: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Re-scores the cases so far (those in `sample`, when given) on the current weights: efficacy,
    paraphrase and magnitude over the cases whose edit is in the model, neighbourhood over all of them; the
    same means of the same cases on the unedited weights (`unedited`: per-case scores); plus held-out
    perplexity, its ratio to the unedited model's (ppl_base), the collapse flag (COLLAPSE_CRITERION) and the
    norms of the weights edited so far."""
    model, tok, dev = bundle.model, bundle.tokenizer, bundle.device
    scored = [(case, ok) for case, ok in seen if sample is None or case.case_id in sample]
    scores = [(counterfact_scores(case_target_nll(model, tok, editor.evaluation_case(case), dev)), ok)
              for case, ok in scored]
    point: dict[str, Any] = {"n_edits": sum(ok for _, ok in seen), "n_cases": len(seen), "n_scored": len(scored),
                             **curve_scores([s for s, ok in scores if ok], [s for s, _ in scores]),
                             "efficacy_magnitude": _mean([s for s, ok in scores if ok], "efficacy_magnitude")}
    if unedited is not None and scored:
        before = [(unedited.get(case.case_id, {}), ok) for case, ok in scored]
        point["unedited"] = curve_scores([s for s, ok in before if ok], [s for s, _ in before])
    ppl = held_out_perplexity(bundle, texts)
    point["ppl"] = ppl if ppl is None or math.isfinite(ppl) else None
    point["n_ppl_texts"] = len(texts) if texts else 0
    base = point["ppl"] if ppl_base is None else ppl_base
    point["ppl_ratio"] = None if base is None or point["ppl"] is None else point["ppl"] / base
    point["collapsed"] = texts is not None and ppl_collapsed(point["ppl"], base)
    point["weights"] = weight_norms(bundle.model, originals or {})
    point["seconds"] = round(time.perf_counter() - started, 2)
    return point


def run_sequential(bundle: ModelBundle, editor: Editor, cases: list[EditCase], pool: Pool, cfg: RunConfig,
                   writer: RunWriter, guard: ModelGuard | None = None) -> list[dict[str, Any]]:
    """Edits accumulate over the whole run; a curve point goes to sequential.jsonl at 0 edits, after every
    eval_every edits and at the end. The edited state is checkpointed with every curve point (checkpoint.pt),
    and a resumed run continues from the last checkpoint. The original weights come back when the run
    ends, and the whole model is verified against its original."""
    from bench.resume import resume_sequential, save_checkpoint

    curve_path = writer.dir / "sequential.jsonl"
    texts = heldout_for_ppl(cfg.curve_ppl_texts)
    originals: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    state = resume_sequential(writer.dir, bundle.model, editor, {c.case_id: c for c in cases})
    originals.update(state.originals)
    seen, points, first_batch = state.seen, state.points, state.batches_done
    sample = curve_sample(cases, cfg.eval_sample, cfg.seed)
    if not points:  # the first point also keeps every re-scored case's scores on the unedited weights
        first = curve_point(bundle, editor, seen, texts, started)
        first["unedited_cases"] = unedited_scores(bundle, cases, sample)
        every_case = list(first["unedited_cases"].values())
        first["unedited"] = curve_scores(every_case, every_case)
        points.append(first)
        append_jsonl(curve_path, points[-1])
    unedited = points[0].get("unedited_cases")

    def add_point() -> None:
        points.append(curve_point(bundle, editor, seen, texts, started, originals, points[0]["ppl"], sample,
                                  unedited))
        append_jsonl(curve_path, points[-1])
        if points[-1]["collapsed"] and not any(p.get("collapsed") for p in points[:-1]):
            log.warning("sequential: the model collapsed after %d edits: held-out perplexity %s, %.1fx the "
                        "unedited %s (%s)", points[-1]["n_edits"], points[-1]["ppl"], points[-1]["ppl_ratio"] or
                        float("nan"), points[0]["ppl"], COLLAPSE_CRITERION)
    try:
        with tqdm(total=len(cases), initial=len(seen), desc=f"{cfg.editor} sequential edits", unit="case") as bar:
            for index, batch in enumerate(batches(cases, cfg.batch_size)):
                if index < first_batch:
                    continue
                seed_batch(cfg.seed, index)
                fresh = [n for n in declared_names(editor, batch) if n not in originals]
                originals.update(backup(bundle.model, fresh))
                for case, record in zip(batch, _safe_batch(bundle, editor, batch, pool, cfg, writer.dir / "circuits",
                                                           index, keep_edits=True)):
                    writer.append(record)
                    seen.append((case, record.get("status") == "ok"))
                bar.update(len(batch))
                raise_if_stopped()
                check_systematic(read_cases(writer.cases_path))
                n_edits = sum(ok for _, ok in seen)
                if n_edits // cfg.eval_every > points[-1]["n_edits"] // cfg.eval_every:
                    add_point()
                    save_checkpoint(writer.dir, bundle.model, editor, originals, seen, points, index + 1)
        if len(seen) > points[-1]["n_cases"]:
            add_point()
        (writer.dir / "checkpoint.pt").unlink(missing_ok=True)
        return points
    finally:
        restore(bundle.model, originals)
        editor.undo()
        if guard is not None:
            guard.verify(lambda: set(originals))


def batches(cases: list[EditCase], size: int) -> list[list[EditCase]]:
    return [cases[i: i + size] for i in range(0, len(cases), size)]


def check_modes(cfg: RunConfig) -> None:
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {cfg.batch_size}")
    if cfg.eval_every < 1:
        raise ValueError(f"--eval-every must be at least 1; got {cfg.eval_every}")
    if cfg.eval_sample < 0:
        raise ValueError(f"--eval-sample cannot be negative; got {cfg.eval_sample}")
    if cfg.ppl_texts < 0 or cfg.curve_ppl_texts < 0:
        raise ValueError("perplexity text counts cannot be negative")


def mode_manifest(cfg: RunConfig) -> dict[str, Any]:
    mode: dict[str, Any] = {"name": "sequential" if cfg.sequential else ("batch" if cfg.batch_size > 1 else "single"),
                            "batch_size": cfg.batch_size}
    if cfg.sequential:
        mode.update(eval_every=cfg.eval_every, eval_sample=cfg.eval_sample or "every case so far",
                    curve_ppl_texts=cfg.curve_ppl_texts, restore="once, at the end")
    else:
        mode.update(ppl_texts=cfg.ppl_texts, restore="after every batch")
    return mode


def ppl_manifest(hparams: dict[str, Any], n_texts: int) -> dict[str, Any]:
    """Which texts the perplexity uses, and whether they overlap the editor's key-statistics texts."""
    info: dict[str, Any] = {"corpus": "wikipedia (offline summaries, sorted by title)",
                            "texts": f"the last {n_texts}", "max_len": 128}
    if heldout_for_ppl(n_texts) is None:
        info["note"] = "off (0 texts)" if n_texts == 0 else "the corpus could not be loaded; no ppl fields"
    elif "mom2_n_samples" in hparams and str(hparams.get("mom2_dataset", DEFAULT_CORPUS)) == DEFAULT_CORPUS:
        info["overlaps_key_statistics"] = overlaps_keystats(n_texts, int(hparams["mom2_n_samples"]),
                                                            len(wiki_texts()[0]))
    return info


# --- the run ---------------------------------------------------------------------------

def run_id(cfg: RunConfig) -> str:
    """Time to the second, then what ran, then a random tag: unique under parallel starts."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    model = cfg.model.rstrip("/").split("/")[-1]
    dataset = Path(cfg.dataset).stem if "/" in cfg.dataset or cfg.dataset.endswith(".json") else cfg.dataset
    name = f"{stamp}-{cfg.editor}-{model}-{dataset}-{secrets.token_hex(3)}"
    return safe_filename(name)  # easyedit:rome, lre:x


def context_length(bundle: ModelBundle) -> int | None:
    config = bundle.model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return None


def case_texts(case: EditCase) -> list[str]:
    """Every text the harness feeds the model for a case (prompts with their answers)."""
    answer = max(case.target_true, case.target_new, key=len)
    texts = [f"{case.rewrite_prompt} {answer}"] + [f"{p} {answer}" for p in case.paraphrases]
    texts += [f"{p} {a}" for group in (case.neighborhood, case.portability, case.locality) for p, a in group]
    return texts + list(case.generation_prompts) + list(case.attribute_prompts) + list(case.reference_texts)


def reject_overlong(bundle: ModelBundle, data: LoadedDataset) -> None:
    """Moves the cases with a text longer than the model's context (less the generated tokens) to rejected."""
    limit = context_length(bundle)
    if limit is None:
        return
    budget = limit - GENERATION_MAX_NEW_TOKENS
    kept = []
    for index, case in enumerate(data.cases):
        # a byte-level token covers at least one byte: only texts longer than the budget in bytes can overflow
        long = [t for t in case_texts(case) if len(t.encode()) > budget]
        longest = max((len(bundle.tokenizer(t).input_ids) for t in long), default=0)
        if longest > budget:
            why = (f"record {index}: a prompt is {longest} tokens; {bundle.name} reads at most {limit}, "
                   f"{GENERATION_MAX_NEW_TOKENS} of them generated")
            log.warning("loading: case %s rejected: %s", case.case_id, why)
            data.rejected.append((case.case_id, why))
        else:
            kept.append(case)
    data.cases[:] = kept


def why_no_cases(counts: dict[str, Any]) -> str:
    """One line: why a run has no case to edit."""
    if counts.get("rejected") and counts["rejected"] >= counts.get("loaded", 0):
        return f"no case to edit: all {counts['rejected']} records were rejected ({top_reasons(counts)})"
    if counts.get("unknown_skipped"):
        return (f"no case to edit: none of the {counts['unknown_skipped']} valid records is known to the model "
                f"(its top-1 answer is not target_true); drop --known-only to edit them")
    return "no case to edit: the dataset has no usable record"


def top_reasons(counts: dict[str, Any], k: int = 3) -> str:
    reasons = [str(r).split(": ", 1)[-1] for r in counts.get("rejected_reasons", [])]
    reasons = [re.sub(r"'[^']*'|\"[^\"]*\"", "…", r) for r in reasons]
    return "; ".join(f"{n}× {why}" for why, n in Counter(reasons).most_common(k)) or "no reason recorded"


def seed_batch(seed: int, batch_index: int) -> None:
    """Every batch starts from its own seed, so a resumed run draws what the uninterrupted one drew."""
    value = (seed * 1_000_003 + batch_index) % 2**32
    random.seed(value)
    torch.manual_seed(value)


@dataclass
class PreparedRun:
    """A run loaded and ready to edit: the model, the editor, the selected cases, the corruption pool and
    the manifest (everything but the run folder). `bench run` and each `bench sweep` worker build one."""

    cfg: RunConfig
    bundle: ModelBundle
    editor: Editor
    cases: list[EditCase]
    pool: Pool
    manifest: dict[str, Any]


def prepare(cfg: RunConfig, stored: dict[str, Any] | None = None) -> PreparedRun:
    """Loads the dataset, model, hyperparameters and editor, and selects the cases (a resumed run, `stored`
    its manifest, keeps the cases it selected)."""
    check_modes(cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    editor_cls = get_editor(cfg.editor)
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    log.info("loading: model %s on %s", cfg.model, cfg.device)
    bundle = load_model(cfg.model, cfg.device, cfg.dtype)
    hparams, hparams_path = load_hparams(cfg.editor, cfg.model, bundle.arch.family, cfg.hparams, bundle.arch.n_layers)
    editor = editor_cls(bundle, hparams)
    reject_overlong(bundle, data)
    editor.observe_dataset(list(data.cases))
    if stored is not None:
        by_id = {c.case_id: c for c in data.cases}
        cases = [by_id[i] for i in stored.get("case_ids", []) if i in by_id]
        counts = stored["cases"]
    else:
        cases, counts = select_cases(bundle, data, cfg.n, cfg.only_known)
        if not cases:
            raise DatasetError(why_no_cases(counts))
    log.info("loading: %d cases kept (%d rejected, %d not known to the model)", counts["kept"], counts["rejected"],
             counts["unknown_skipped"])
    manifest = {"editor": cfg.editor, "hparams": editor.hparams, "hparams_file": hparams_path, "seed": cfg.seed,
                "model": bundle.provenance, "device": str(bundle.device),
                "dataset": {"name": data.name, "path": data.path, "sha256": data.sha256, "split": data.split},
                "cases": counts, "case_ids": [c.case_id for c in cases], "n_planned": len(cases),
                "circuits": {"enabled": cfg.circuits, "method": "eap", "top_n": cfg.top_n, "graph": cfg.graph,
                             "ablation": cfg.ablation, "metric": cfg.metric,
                             "n_graph_edges": Graph.of(bundle.arch, cfg.graph).n_edges},
                "mode": mode_manifest(cfg),
                "perplexity": ppl_manifest(hparams, cfg.curve_ppl_texts if cfg.sequential else cfg.ppl_texts),
                "config": vars(cfg)}
    return PreparedRun(cfg, bundle, editor, cases, CorruptionPool.from_cases(data.cases), manifest)


def open_writer(cfg: RunConfig, manifest: dict[str, Any], stored: dict[str, Any] | None = None,
                resume: Path | None = None) -> RunWriter:
    """A new run folder under cfg.output, or the resumed one, whose manifest must match `manifest`."""
    from bench.resume import config_differences

    if stored is None or resume is None:
        return new_writer(cfg, manifest)
    differences = config_differences(stored, manifest)
    if differences:
        raise ValueError(f"cannot resume {resume}: {differences[0]}"
                         + (f" (and {len(differences) - 1} more changes)" if len(differences) > 1 else ""))
    return RunWriter(resume, stored, resume=True)


def run(cfg: RunConfig, resume: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """A new run into cfg.output, or (resume) the rest of the run folder `resume`, whose manifest must
    match cfg's configuration."""
    from bench.resume import check_resumable, stored_manifest

    stored = None
    if resume is not None:
        stored = stored_manifest(resume)
        check_resumable(resume, stored)
    prepared = prepare(cfg, stored)
    writer = open_writer(cfg, prepared.manifest, stored, resume)
    if cfg.circuits or cfg.relation_circuits:
        warm_bridge(prepared.bundle)
    guard = ModelGuard.of(prepared.bundle.model, cfg.editor)
    return execute(prepared.bundle, prepared.editor, prepared.cases, prepared.pool, cfg, writer, guard)


@torch.no_grad()
def warm_bridge(bundle: ModelBundle) -> None:
    """Builds the TransformerLens bridge and runs it once: it adds its own tensors and wires its capture
    hooks on first use, which must happen before the model's original state is fingerprinted."""
    ids = torch.tensor([bundle.tokenizer("The capital of France is").input_ids], device=bundle.device)
    bundle.bridge()(ids)


def new_writer(cfg: RunConfig, manifest: dict[str, Any]) -> RunWriter:
    for _ in range(5):
        try:
            return RunWriter(Path(cfg.output) / run_id(cfg), manifest)
        except FileExistsError:
            continue
    raise OSError(f"could not create a new run folder under {cfg.output}")


def execute(bundle: ModelBundle, editor: Editor, cases: list[EditCase], pool: Pool, cfg: RunConfig,
            writer: RunWriter, guard: ModelGuard) -> tuple[Path, dict[str, Any]]:
    """Edits the cases not yet in the run folder and writes the summary with the run's final state:
    complete, interrupted (SIGINT or SIGTERM) or failed (systematic failures, a model left changed)."""
    extra = summary_fields(cfg, writer.manifest)
    log.info("editing: %s on %d cases (%s mode, batch size %d)%s", cfg.editor, len(cases), extra["mode"],
             cfg.batch_size, f", with pre/post circuits (EAP, top {cfg.top_n} edges, {cfg.graph} graph)" if cfg.circuits
             else "")

    def edit_all() -> None:
        if cfg.sequential:
            extra.update(final_curve_fields(run_sequential(bundle, editor, cases, pool, cfg, writer, guard)))
        else:
            run_batches(bundle, editor, cases, pool, cfg, writer, guard)

    return writer.dir, run_to_end(edit_all, writer, extra, (SystematicFailure, IntegrityError))


def run_to_end(work: Callable[[], None], writer: RunWriter, extra: dict[str, Any],
               failures: tuple[type[Exception], ...]) -> dict[str, Any]:
    """Runs `work` and writes the run's summary and final state: complete; interrupted by SIGINT or SIGTERM
    (the signal goes into `extra`); or failed on one of `failures` (its message is the error). Any other
    exception marks the run failed and propagates."""
    status, error = "complete", None
    try:
        work()
    except KeyboardInterrupt as exc:
        status = "interrupted"
        extra["signal"] = signal_name(exc)
        log.warning("interrupted (%s): the summary covers the cases already written", extra["signal"])
    except failures as exc:
        status, error = "failed", str(exc)
    except BaseException as exc:
        writer.finish(extra, "failed", f"{type(exc).__name__}: {exc}")
        raise
    return finish_run(writer, extra, status, error)


def summary_fields(cfg: RunConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """The run's settings that its summary carries besides the aggregates."""
    return {"seed": cfg.seed, "device": manifest["device"], "top_n": cfg.top_n, "graph": cfg.graph,
            "mode": manifest["mode"]["name"], "batch_size": cfg.batch_size,
            **selection_counts(manifest["cases"], cfg.only_known)}


def finish_run(writer: RunWriter, extra: dict[str, Any], status: str, error: str | None) -> dict[str, Any]:
    """The summary and the final state; a run that completed without a single edited case has failed. A
    SIGINT or SIGTERM arriving meanwhile takes effect once both are written."""
    log.info("scoring: aggregating %s", writer.cases_path)
    with interrupts_deferred():
        if status == "complete":
            rows = read_cases(writer.cases_path)
            if not any(r.get("status") == "ok" for r in rows):
                status, error = "failed", f"no case was edited: all {len(rows)} cases failed ({failure_reasons(rows)})"
        return writer.finish(extra, status, error)


def failure_reasons(rows: list[dict[str, Any]], k: int = 2) -> str:
    reasons = Counter(f"{r.get('reason', '?')[:160]} [{r.get('phase', '?')}]" for r in rows
                      if r.get("status") == "failed")
    return "; ".join(f"{n}× {why}" for why, n in reasons.most_common(k))


def check_systematic(rows: list[dict[str, Any]]) -> None:
    """Stops the run when its first SYSTEMATIC_FAILURES cases all failed."""
    first = rows[:SYSTEMATIC_FAILURES]
    if len(first) == SYSTEMATIC_FAILURES and all(r.get("status") == "failed" for r in first):
        raise SystematicFailure(f"the first {SYSTEMATIC_FAILURES} cases all failed, so the failure is systematic "
                                f"and the run stopped: {failure_reasons(first)}")


def run_batches(bundle: ModelBundle, editor: Editor, cases: list[EditCase], pool: Pool, cfg: RunConfig,
                writer: RunWriter, guard: ModelGuard | None = None) -> None:
    """Every batch not yet fully in cases.jsonl (a resumed run skips the others), each restored and the
    whole model verified against its original afterwards."""
    written = read_cases(writer.cases_path)
    done = {r.get("case_id") for r in written}
    # every batch starts from the same restored weights, so the pre-edit perplexity is computed once
    ppl_pre = held_out_perplexity(bundle, heldout_for_ppl(cfg.ppl_texts))
    with tqdm(total=len(cases), initial=len(done & {c.case_id for c in cases}), desc=f"{cfg.editor} edits",
              unit="case") as bar:
        for index, batch in enumerate(batches(cases, cfg.batch_size)):
            if all(case.case_id in done for case in batch):
                continue
            for record in edit_batch(bundle, editor, batch, pool, cfg, writer.dir / "circuits", index, ppl_pre):
                if record["case_id"] not in done:  # a resumed batch: its written cases stay as they are
                    writer.append(record)
                    written.append(record)
            bar.update(sum(case.case_id not in done for case in batch))
            raise_if_stopped()
            if guard is not None:
                guard.verify(lambda: declared_names(editor, batch))
            check_systematic(written)


def edit_batch(bundle: ModelBundle, editor: Editor, batch: list[EditCase], pool: Pool, cfg: RunConfig,
               circuit_dir: Path, index: int, ppl_pre: float | None) -> list[dict[str, Any]]:
    """Batch `index` of a run from its own seed: pre-scores, edit, post-scores, restore; one record per case,
    a failure recorded on its cases. `bench run` and every `bench sweep` worker edit through this."""
    seed_batch(cfg.seed, index)
    return _safe_batch(bundle, editor, batch, pool, cfg, circuit_dir, index, ppl_pre=ppl_pre)


def declared_names(editor: Editor, cases: list[EditCase]) -> set[str]:
    try:
        return set(touched_parameters(editor, cases))
    except Exception:  # noqa: BLE001 - only used to word an error message
        return set()


def final_curve_fields(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The last curve point, and the perplexity before any edit, as flat summary fields."""
    last = points[-1]
    fields = {f"sequential_{key}": last[key] for key in ("n_edits", "efficacy", "paraphrase", "neighborhood",
                                                         "score", "ppl")}
    fields["sequential_ppl_base"] = points[0]["ppl"]
    first = next((p for p in points if p.get("collapsed")), None)
    fields["sequential_collapsed_at"] = None if first is None else first["n_edits"]
    fields["collapse_criterion"] = COLLAPSE_CRITERION
    return fields


def _safe_batch(bundle: ModelBundle, editor: Editor, cases: list[EditCase], pool: Pool, cfg: RunConfig,
                circuit_dir: Path, batch_index: int = 0, keep_edits: bool = False,
                ppl_pre: float | None = None) -> list[dict[str, Any]]:
    """Runs one batch; any exception fails that batch's cases only, recorded with its type, message and
    phase (the weights are restored by run_batch). A failed restore stops the run."""
    try:
        records = run_batch(bundle, editor, cases, pool, cfg, circuit_dir, batch_index, keep_edits, ppl_pre)
    except IntegrityError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure of a case is recorded on the case
        records = [failed_record(case, batch_index, exc) for case in cases]
    for record in records:
        if record.get("status") == "failed":
            log.warning("case %s failed (%s): %s", record["case_id"], record.get("phase"), record.get("reason"))
        for key, value in list(record.items()):
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
    return records


@contextmanager
def case_phase(phase: str) -> Iterator[None]:
    """Marks an exception raised inside with the phase of the case it happened in (the innermost wins)."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "case_phase"):
            exc.case_phase = phase  # type: ignore[attr-defined]
        raise


def phase_of(exc: BaseException) -> str:
    """edit, score, circuit or restore: a scoring-phase exception raised inside circuit discovery is 'circuit'."""
    phase = getattr(exc, "case_phase", "score")
    if phase == "score":
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "find_circuit" or code.co_filename.startswith(CIRCUITS_DIR):
                return "circuit"
            tb = tb.tb_next
    return phase


def failed_record(case: EditCase, batch_index: int, exc: BaseException) -> dict[str, Any]:
    message = (str(exc).strip().splitlines() or [""])[0][:400]
    return {"case_id": case.case_id, "relation": case.relation, "subject": case.subject,
            "target_true": case.target_true, "target_new": case.target_new, "batch_index": batch_index,
            "status": "failed", "phase": phase_of(exc), "error": {"type": type(exc).__name__, "message": message},
            "reason": f"{type(exc).__name__}: {message}"[:500]}


def _safe_case(bundle: ModelBundle, editor: Editor, case: EditCase, pool: Pool, cfg: RunConfig,
               circuit_dir: Path) -> dict[str, Any]:
    """Runs one case; an exception inside the editor fails that case only (weights are restored)."""
    return _safe_batch(bundle, editor, [case], pool, cfg, circuit_dir)[0]
