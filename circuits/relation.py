"""Circuits of a set of prompts (a relation's facts, or one fact), found on a validation split and scored on a
test split, as in Yao et al. 2024 (Knowledge Circuits), Sec. 3-4.

The inputs are tokenised prompts and answers (`PromptRow`: clean ids, corrupted ids, the answer's first
token, the corrupting subject's answer token, where the query starts); which facts, templates,
demonstrations and corrupting subjects make them is the harness's business (bench/relation_circuits.py).

1. The circuit: edge attributions (EAP by default; any method of `circuits.attribute.attribute`) with the
   chosen metric (circuits/metrics.py) and ablation (circuits/ablation.py), summed over the validation
   prompts and divided by their number, and the top-n edges by |score|. The size n is either given, or
   chosen on the validation split alone: the smallest size of SIZE_GRID whose circuit reaches the full
   model's validation Hit@10 (else the size with the best validation Hit@10). The test split is read only
   after the size is fixed. With `query_start` > 0 (demonstrations before the query) only the query's
   positions are ablated, so the circuit is read at the query's positions.
   With method `acdc` (circuits/acdc.py) the circuit is instead what ACDC leaves on the validation prompts
   (all of them in one forward pass per test) at its threshold; there is no size to choose.
2. Evaluation on both splits (the paper's Table 1): Hit@10 of the full model, of the circuit (edges outside
   it carry their ablated value, `circuits.evaluate.patched_logits`), and of random circuits with as many
   edges (uniform over the graph's edges; mean of `random_draws` draws). Hit@10 = the answer's first token
   is among the 10 largest logits at the last prompt position (KC's `get_hit10`). Also the normalised
   faithfulness (m(C) - m(ablated)) / (m(full) - m(ablated)) with the chosen metric (undefined when the
   denominator is below 1e-9), and MIB's CPR and CMD on the test split (`circuits.curve.mib_curves`, the
   same code as for case circuits: CPR from the top-k edges by signed score, CMD by |score|, each pruned).

KC's Table 1 circuits come from ACDC with threshold tau = 0.01 on the validation split: method `acdc`
(`KC_SETTING`). The attribution methods are a labelled variant of it, sized by the rule above.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from circuits.ablation import ablated_outputs, check_ablation
from circuits.acdc import ACDC_THRESHOLD, acdc, check_threshold
from circuits.activations import PairBatch
from circuits.attribute import METHODS, attribute, check_method
from circuits.circuit import Circuit, circuit_nodes, top_edges
from circuits.curve import mib_curves, normalized_faithfulness
from circuits.evaluate import patched_logits
from circuits.graph import Graph
from circuits.metrics import Metric, prepared_metric

log = logging.getLogger("bench")


HIT_K = 10
# Candidate circuit sizes for the validation rule (step 4 of the module doc).
SIZE_GRID = (25, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
CHUNK = 8  # prompts per forward pass; bounds the [n_upstream, B, P, D] activation buffers
DISCOVERY_METHODS = (*METHODS, "acdc")  # the attribution methods, and ACDC (circuits/acdc.py)


@dataclass(frozen=True)
class CircuitSetting:
    """How a relation circuit is built and scored."""

    method: str = "eap"
    ablation: str = "corrupted"
    metric: str = "logprob"
    shots: int = 0
    graph: str | None = None  # "ungrouped" or "grouped" k/v receivers; None: circuits.graph's default
    acdc_threshold: float = ACDC_THRESHOLD  # method acdc only

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        if self.method == "acdc":
            check_threshold(self.acdc_threshold)
        elif self.method in METHODS:
            check_method(self.method, self.ablation)
        else:
            raise ValueError(f"unknown method '{self.method}'; choose from {', '.join(DISCOVERY_METHODS)}")
        Metric(self.metric)  # validates the name
        if self.shots < 0:
            raise ValueError("--shots must be 0 or more")

    @property
    def needs_partner(self) -> bool:
        """Corrupted patching, and logit-diff's wrong answer, need a corrupting subject per prompt."""
        return self.ablation == "corrupted" or self.metric == "logit-diff"


KC_SETTING = CircuitSetting(method="acdc", ablation="zero", metric="match-nll", acdc_threshold=ACDC_THRESHOLD)



# --- prompt rows -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptRow:
    """One prompt, tokenised: clean ids, corrupted ids of the same length (the clean ids when no partner is
    needed), the answer's first token, the corrupting subject's answer token, and where the query starts."""

    clean: list[int]
    corrupt: list[int]
    answer: int
    corrupt_answer: int | None = None
    query_start: int = 0


def batches(rows: list[PromptRow], tokenizer, device: torch.device, chunk: int = CHUNK) -> list[PairBatch]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(rows), chunk):
        block = rows[i: i + chunk]
        wrong = [r.corrupt_answer for r in block]
        starts = [r.query_start for r in block]
        out.append(PairBatch.from_rows([(r.clean, r.corrupt, r.answer) for r in block], pad, device,
                                       corrupt_answers=None if None in wrong else wrong,
                                       ablate_from=starts if any(starts) else None))
    return out


def reference_batch(rows: list[PromptRow], tokenizer, device: torch.device) -> PairBatch:
    """All validation rows in one batch: the mean ablation's reference set."""
    return batches(rows, tokenizer, device, chunk=max(1, len(rows)))[0]


# --- attribution --------------------------------------------------------------------------------

def graph_of(arch, kind: str | None = None) -> Graph:
    """The model's edge graph (`kind`: "ungrouped" or "grouped" k/v receivers; None: the default)."""
    of = getattr(Graph, "of", None)
    if of is not None:
        return of(arch) if kind is None else of(arch, kind)
    if kind not in (None, "grouped"):
        raise ValueError(f"graph '{kind}' is not available in this version; use grouped")
    return Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)


def graph_kind(graph: Graph) -> str:
    return getattr(graph, "kind", "ungrouped" if graph.n_kv_heads == graph.n_heads else "grouped")


def relation_scores(bundle, graph: Graph, chunks: list[PairBatch], setting: CircuitSetting = CircuitSetting(),
                    reference: PairBatch | None = None) -> torch.Tensor:
    """Mean attribution per validation prompt [n_upstream, n_receivers], accumulated chunk by chunk."""
    total = None
    for batch in chunks:
        scores = attribute(bundle.bridge(), bundle.model, bundle.arch, graph, batch, setting.method,
                           metric=setting.metric, ablation=setting.ablation, reference=reference).float()
        total = scores if total is None else total + scores
    n_rows = sum(b.clean_ids.shape[0] for b in chunks)
    return total / n_rows


def circuit_from_scores(scores: torch.Tensor, graph: Graph, top_n: int, method: str, answer: str,
                        settings: dict[str, Any] | None = None) -> tuple[Circuit, torch.Tensor]:
    keep = top_edges(scores, graph, top_n)
    return circuit_of(keep, scores, graph, method, answer, dict(settings or {}, top_n=top_n)), keep


def circuit_of(keep: torch.Tensor, scores: torch.Tensor, graph: Graph, method: str, answer: str,
               settings: dict[str, Any], setting: CircuitSetting | None = None) -> Circuit:
    """The Circuit of an edge mask, each edge with its score; `setting` fills in its ablation and metric."""
    up, recv = keep.nonzero(as_tuple=True)
    values = scores[up, recv].tolist()
    edges = {graph.edge_name(u, r): v for u, r, v in zip(up.tolist(), recv.tolist(), values)}
    described = {} if setting is None else {
        "ablation": setting.ablation, "metric": setting.metric,
        "selection": "acdc-threshold" if setting.method == "acdc" else "top-n"}
    return Circuit(method=method, answer=answer, edges=edges, nodes=circuit_nodes(keep, graph),
                   n_graph_edges=graph.n_edges, settings=settings, graph=graph_kind(graph), **described)


def setting_fields(setting: CircuitSetting) -> dict[str, Any]:
    """The setting as recorded: the ACDC threshold only for method acdc."""
    fields = asdict(setting)
    if setting.method != "acdc":
        del fields["acdc_threshold"]
    return fields


def random_edges(graph: Graph, n: int, seed: int) -> torch.Tensor:
    """A [n_upstream, n_receivers] mask of n edges drawn uniformly without replacement."""
    existing = graph.edge_mask.nonzero()
    pick = existing[torch.randperm(len(existing), generator=torch.Generator().manual_seed(seed))[:n]]
    keep = torch.zeros_like(graph.edge_mask)
    keep[pick[:, 0], pick[:, 1]] = True
    return keep


# --- evaluation ------------------------------------------------------------------------------------

def hits(logits: torch.Tensor, batch: PairBatch, k: int = HIT_K) -> torch.Tensor:
    """[B] bool: the answer's first token is among the k largest logits at the answer position. Ties count
    against the answer (a run whose logits are all equal, e.g. RMSNorm of a zero-ablated residual, hits
    nothing)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.answer_pos].float()
    target = last[rows, batch.answer_ids]
    return (last >= target[:, None]).sum(-1) - 1 < k


@dataclass
class Measured:
    """Per-row metric values and Hit@10 of one way of running the model."""

    value: torch.Tensor
    hit: torch.Tensor

    def summary(self) -> dict[str, float]:
        return {"metric": float(self.value.mean()), "hit_at_10": float(self.hit.float().mean())}


class ScoringSet:
    """One split's prompts in chunks, with their clean and ablated runs cached for repeated patching."""

    def __init__(self, bundle, graph: Graph, chunks: list[PairBatch], setting: CircuitSetting = CircuitSetting(),
                 reference: PairBatch | None = None):
        self.bundle, self.graph, self.chunks, self.setting = bundle, graph, chunks, setting
        self.ablated: list[torch.Tensor] = []
        self.metrics: list[Metric] = []
        clean, ablated = [], []
        bridge, model, arch = bundle.bridge(), bundle.model, bundle.arch
        with torch.no_grad():
            for batch in chunks:
                clean_logits = bridge.run_with_hooks(batch.clean_ids, fwd_hooks=[], attention_mask=batch.attention_mask)
                outputs, ablated_logits = ablated_outputs(bridge, graph, arch, model, batch, setting.ablation, reference)
                if setting.ablation == "zero" and batch.ablate_mask is None:
                    outputs = outputs.new_zeros(()).expand(outputs.shape)  # no [n_upstream, B, P, D] buffer kept
                if ablated_logits is None:
                    ablated_logits = patched_logits(bridge, model, arch, graph, batch,
                                                    torch.zeros_like(graph.edge_mask), outputs)
                metric = prepared_metric(bridge, batch, setting.metric, clean_logits=clean_logits,
                                         corrupt_logits=ablated_logits)
                self.ablated.append(outputs)
                self.metrics.append(metric)
                clean.append((metric(clean_logits, batch), hits(clean_logits, batch)))
                ablated.append((metric(ablated_logits, batch), hits(ablated_logits, batch)))
        self.clean = Measured(*map(torch.cat, zip(*clean)))
        self.corrupted = Measured(*map(torch.cat, zip(*ablated)))  # every edge ablated

    @property
    def n_prompts(self) -> int:
        return int(self.clean.value.shape[0])

    def with_edges(self, keep: torch.Tensor) -> Measured:
        """The model with only `keep`'s edges clean; every other edge carries its ablated value."""
        parts = []
        bridge, model, arch = self.bundle.bridge(), self.bundle.model, self.bundle.arch
        for batch, outputs, metric in zip(self.chunks, self.ablated, self.metrics):
            logits = patched_logits(bridge, model, arch, self.graph, batch, keep.to(outputs.device), outputs)
            parts.append((metric(logits, batch), hits(logits, batch)))
        return Measured(*map(torch.cat, zip(*parts)))

    def mean_values(self, keeps: Sequence[torch.Tensor]) -> list[float]:
        """The mean metric of each circuit in `keeps` (as `with_edges(keep).value.mean()`), all of them in one
        forward pass per chunk with the prompts repeated once per circuit."""
        stacked = torch.stack(list(keeps))
        bridge, model, arch = self.bundle.bridge(), self.bundle.model, self.bundle.arch
        per_circuit: list[list[torch.Tensor]] = [[] for _ in keeps]
        for batch, outputs, metric in zip(self.chunks, self.ablated, self.metrics):
            logits = patched_logits(bridge, model, arch, self.graph, batch, stacked.to(outputs.device), outputs)
            for values, part in zip(per_circuit, logits.chunk(len(keeps))):
                values.append(metric(part, batch))
        return [float(torch.cat(values).mean()) for values in per_circuit]

    def faithfulness(self, measured: Measured) -> float:
        return normalized_faithfulness(float(measured.value.mean()), float(self.clean.value.mean()),
                                       float(self.corrupted.value.mean()))

    def faithfulness_block(self, measured: Measured) -> dict[str, float]:
        return {"clean": float(self.clean.value.mean()), "ablated": float(self.corrupted.value.mean()),
                "circuit": float(measured.value.mean()), "faithfulness": self.faithfulness(measured)}


def hit_table(scoring: ScoringSet, keep: torch.Tensor, random_draws: int, seed: int) -> tuple[dict[str, Any], Measured]:
    """The paper's Table 1 row: Hit@10 of the full model, the circuit and same-size random circuits."""
    n_edges = int(keep.sum())
    circuit = scoring.with_edges(keep)
    random_hits = [float(scoring.with_edges(random_edges(scoring.graph, n_edges, seed + i)).hit.float().mean())
                   for i in range(random_draws)]
    table = {"full_model": float(scoring.clean.hit.float().mean()), "circuit": float(circuit.hit.float().mean()),
             "random_circuit": sum(random_hits) / len(random_hits) if random_hits else None,
             "random_circuit_draws": random_hits, "ablated_model": float(scoring.corrupted.hit.float().mean()),
             "n_prompts": scoring.n_prompts, "n_edges": n_edges, "n_graph_edges": scoring.graph.n_edges, "k": HIT_K}
    return table, circuit


def select_size(validation: ScoringSet, scores: torch.Tensor, grid: Sequence[int] = SIZE_GRID,
                progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """The smallest size of the grid whose circuit reaches the full model's Hit@10 on the validation split,
    else the size with the best validation Hit@10 (the smallest among ties). Reads the validation set only."""
    graph = validation.graph
    target = float(validation.clean.hit.float().mean())
    sizes = sorted({min(n, graph.n_edges) for n in grid if n >= 1})
    tried: list[dict[str, float]] = []
    for n in sizes:
        hit = float(validation.with_edges(top_edges(scores, graph, n)).hit.float().mean())
        tried.append({"n_edges": n, "validation_hit_at_10": hit})
        progress(f"circuit: size {n}: validation Hit@10 {hit:.3f} (full model {target:.3f})")
        if hit >= target - 1e-9:
            return {"chosen": n, "reached_full_model": True, "full_model_validation_hit_at_10": target,
                    "tried": tried}
    best = max(tried, key=lambda t: (t["validation_hit_at_10"], -t["n_edges"]))
    return {"chosen": int(best["n_edges"]), "reached_full_model": False,
            "full_model_validation_hit_at_10": target, "tried": tried}


SIZE_RULE = ("the smallest size of the grid whose circuit reaches the full model's validation Hit@10 "
             "(else the best validation Hit@10); chosen on the validation split only")


@dataclass
class CircuitResult:
    """A circuit found on the validation rows and scored on both splits."""

    circuit: Circuit
    keep: torch.Tensor
    scores: torch.Tensor
    test: ScoringSet
    report: dict[str, Any]
    circuit_run: Measured  # the circuit's per-test-prompt metric values and hits


METRIC_DOC = {"logprob": "log p(answer's first token) at the last prompt position",
              "logit-diff": "logit(answer) - logit(corrupting subject's answer) at the last prompt position",
              "match-nll": "NLL(answer) - NLL(answer) under the full model (KC's match_nll)"}


@dataclass
class Discovered:
    """A circuit found on the validation rows, before it is scored."""

    keep: torch.Tensor
    scores: torch.Tensor  # what each edge's value in the circuit JSON and the CPR/CMD ranking are
    scores_meaning: str
    validation: ScoringSet
    sizing: dict[str, Any]
    extra: dict[str, Any]  # report sections of the method (ACDC's counts)


def _by_attribution(bundle, graph: Graph, val_rows: list[PromptRow], setting: CircuitSetting,
                    reference: PairBatch | None, top_n: int | None, size_grid: Sequence[int],
                    progress: Callable[[str], None], timings: dict[str, float]) -> Discovered:
    """Edge attributions summed over the validation prompts, the top-n edges; n given or chosen there."""
    tok, dev = bundle.tokenizer, bundle.device
    start = time.perf_counter()
    progress(f"circuit: {setting.method} attribution ({setting.ablation} ablation, {setting.metric}) over "
             f"{len(val_rows)} validation prompts ({graph.n_edges} edges)")
    scores = relation_scores(bundle, graph, batches(val_rows, tok, dev), setting, reference)
    timings["attribution"] = time.perf_counter() - start
    start = time.perf_counter()
    validation = ScoringSet(bundle, graph, batches(val_rows, tok, dev), setting, reference)
    if top_n is None:
        sizing = dict(select_size(validation, scores, size_grid, progress), rule=SIZE_RULE,
                      grid=sorted(set(size_grid)))
    else:
        sizing = {"rule": f"fixed: --top-n {top_n}", "chosen": min(top_n, graph.n_edges)}
    timings["size_selection"] = time.perf_counter() - start
    keep = top_edges(scores, graph, sizing["chosen"])
    return Discovered(keep, scores, "mean attribution per validation prompt", validation, sizing, {})


ACDC_SCORES = ("ACDC's effect of removing the edge when it was tested: m(removed) - m(current), "
               "mean over the validation prompts; 0 for edges never tested")


def _by_acdc(bundle, graph: Graph, val_rows: list[PromptRow], setting: CircuitSetting,
             reference: PairBatch | None, progress: Callable[[str], None], timings: dict[str, float],
             speculate: int = 1) -> Discovered:
    """ACDC on the validation prompts, all of them in one forward pass per test (or per `speculate` tests)."""
    validation = ScoringSet(bundle, graph, batches(val_rows, bundle.tokenizer, bundle.device, chunk=len(val_rows)),
                            setting, reference)
    progress(f"circuit: ACDC (threshold {setting.acdc_threshold:g}, {setting.ablation} ablation, {setting.metric}) "
             f"over {len(val_rows)} validation prompts ({graph.n_edges} edges; one forward pass per test)")
    found = acdc(lambda keep: float(validation.with_edges(keep).value.mean()), graph, setting.acdc_threshold,
                 measure_many=validation.mean_values, speculate=speculate)
    timings["acdc"] = found.seconds
    progress(f"circuit: ACDC kept {found.n_edges} edges after {found.n_forward} tests in {found.n_passes} forward "
             f"passes ({found.seconds:.0f} s)")
    sizing = {"rule": f"acdc: the edges left at threshold {setting.acdc_threshold:g}", "chosen": found.n_edges}
    return Discovered(found.keep, found.effects.nan_to_num(0.0), ACDC_SCORES, validation, sizing,
                      {"acdc": found.summary()})


def find_circuit(bundle, name: str, val_rows: list[PromptRow], test_rows: list[PromptRow], *,
                 setting: CircuitSetting = CircuitSetting(), top_n: int | None = None,
                 size_grid: Sequence[int] = SIZE_GRID, seed: int = 0, random_draws: int = 3, curve: bool = True,
                 acdc_batch: int = 1, progress: Callable[[str], None] = log.info) -> CircuitResult:
    """Builds the circuit on the validation rows (ACDC, or attribution sized there when top_n is None) and
    scores it on both splits. `bundle` has `tokenizer` (for the pad id), `device`, `model`, `arch` and
    `bridge()`."""
    if not val_rows or not test_rows:
        raise ValueError(f"'{name}': no validation or no test prompts ({len(val_rows)}, {len(test_rows)})")
    if setting.method == "acdc" and top_n is not None:
        raise ValueError("--top-n does not apply to --method acdc: its threshold sets the circuit's size")
    tok, dev = bundle.tokenizer, bundle.device
    graph = graph_of(bundle.arch, setting.graph)
    reference = reference_batch(val_rows, tok, dev) if setting.ablation == "mean" else None
    timings: dict[str, float] = {}
    if setting.method == "acdc":
        found = _by_acdc(bundle, graph, val_rows, setting, reference, progress, timings, acdc_batch)
    else:
        found = _by_attribution(bundle, graph, val_rows, setting, reference, top_n, size_grid, progress, timings)
    keep, scores, validation, sizing = found.keep, found.scores, found.validation, found.sizing
    settings = {"validation_prompts": len(val_rows), "test_prompts": len(test_rows), "scores": found.scores_meaning,
                **setting_fields(setting)}
    if setting.method != "acdc":
        settings["top_n"] = sizing["chosen"]
    circuit = circuit_of(keep, scores, graph, setting.method, name, settings, setting)

    start = time.perf_counter()
    progress(f"circuit: scoring {len(circuit.edges)} edges on {len(val_rows)} validation and "
             f"{len(test_rows)} test prompts")
    val_table, val_run = hit_table(validation, keep, random_draws, seed)
    val_faith = validation.faithfulness_block(val_run)
    del validation
    test = ScoringSet(bundle, graph, batches(test_rows, tok, dev), setting, reference)  # after the size is fixed
    test_table, circuit_run = hit_table(test, keep, random_draws, seed)
    faith = {"metric": f"{METRIC_DOC[setting.metric]}, mean over the split's prompts", "validation": val_faith,
             "test": test.faithfulness_block(circuit_run)}
    faith["faithfulness"] = faith["test"]["faithfulness"]
    circuit.metrics = {"metric_clean": faith["test"]["clean"], "metric_corrupted": faith["test"]["ablated"],
                       "metric_circuit": faith["test"]["circuit"], "faithfulness": faith["faithfulness"],
                       "hit_at_10_full": test_table["full_model"], "hit_at_10_circuit": test_table["circuit"]}
    timings["evaluation"] = time.perf_counter() - start
    report: dict[str, Any] = {
        "method": setting.method, "top_n": sizing["chosen"], "seed": seed,
        "setting": {**{k: v for k, v in setting_fields(setting).items() if k != "graph"}, "graph": graph_kind(graph),
                    "size_rule": sizing["rule"],
                    "hit_k": HIT_K, "circuit_read_at": "the query's positions" if setting.shots else "all positions"},
        "size_selection": sizing,
        "circuit": {"n_edges": len(circuit.edges), "n_nodes": len(circuit.nodes), "n_graph_edges": graph.n_edges,
                    "scores": found.scores_meaning},
        **found.extra,
        "faithfulness": faith,
        "hit_at_10": {"validation": val_table, "test": test_table},
    }
    if curve:
        start = time.perf_counter()
        progress("circuit: MIB's CPR and CMD curves on the test split (2 x 10 sizes)")
        report["faithfulness_curve"] = mib_curves(scores, graph, lambda keep: test.faithfulness(test.with_edges(keep)))
        timings["curve"] = time.perf_counter() - start
    report["seconds"] = timings
    return CircuitResult(circuit, keep, scores, test, report, circuit_run)


