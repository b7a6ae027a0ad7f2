"""Circuits: discovery for one fact (method, ablation, metric, level, selection), overlap between two circuits.

discover() = attribute (circuits/attribute.py, circuits/exact.py) -> select (circuits/selection.py:
top-n, threshold or greedy edges, or top-n nodes; pruned to input -> logits paths by default, as EAP-IG) ->
evaluate (circuits/evaluate.py: faithfulness under the same ablation and metric). The circuit JSON
records every one of those choices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuits.activations import PairBatch
from circuits.attribute import DEFAULT_IG_STEPS, attribute, node_scores
from circuits.evaluate import circuit_metrics
from circuits.graph import DEFAULT_GRAPH, Graph
from circuits.metrics import as_metric
from circuits.selection import node_circuit, prune, select_edges, top_edges  # noqa: F401  (top_edges re-exported)

# Per-case circuit size: chosen out of sample on dev facts (benchmarks/choose_top_n.py: the smallest of
# 300, 1000, 3000, 10000 whose median held-out faithfulness on SmolLM2's ungrouped graph is >= 0.8).
DEFAULT_TOP_N = 10000


@dataclass
class Circuit:
    method: str
    answer: str
    edges: dict[str, float]  # "sender->receiver" -> attribution score (node level: the sender's node score)
    nodes: list[str]
    n_graph_edges: int
    metrics: dict[str, float] = field(default_factory=dict)
    ablation: str = "corrupted"
    metric: str = "logprob"
    selection: str = "top-n"
    level: str = "edge"
    settings: dict[str, Any] = field(default_factory=dict)  # top_n, threshold, ig_steps, pruned
    node_scores: dict[str, float] = field(default_factory=dict)  # node level only
    graph: str = "grouped"  # "ungrouped" (EAP-IG/MIB, the default of discover) or "grouped"; files that predate
    # the field were built on the grouped graph
    scores: torch.Tensor | None = field(default=None, repr=False, compare=False)  # every edge's score, in memory

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "scores"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        return cls(**data)

    def save(self, path: Path, with_scores: bool = False) -> None:
        """The circuit JSON; with_scores also writes every edge's score to <path stem>.scores.pt
        (what `bench circuit-export` needs for MIB's format)."""
        path.write_text(json.dumps(self.to_json()))
        if with_scores and self.scores is not None:
            torch.save(self.scores.detach().cpu().float(), scores_path(path))


def scores_path(circuit_path: Path) -> Path:
    return circuit_path.with_name(circuit_path.name.removesuffix(".json") + ".scores.pt")


def circuit_nodes(keep: torch.Tensor, graph: Graph) -> list[str]:
    """The circuit's nodes as EAP-IG counts them: the senders (input, heads, MLPs) that lie on an
    input -> logits path of the circuit, i.e. the senders of its edges once pruned. A node that only
    receives edges, or only sends them into a dead end, does not count; the logits are not a node."""
    up, _ = prune(keep, graph).nonzero(as_tuple=True)
    return sorted({graph.upstream_names[i] for i in up.tolist()})


def node_attribution(circuit: Circuit) -> dict[str, float]:
    """Each circuit node's share of the circuit's total attribution: the sum of |score| over the node's
    outgoing circuit edges, divided by the sum of |score| over all circuit edges (shares sum to 1)."""
    totals: dict[str, float] = {}
    for name, score in circuit.edges.items():
        sender = name.split("->")[0]
        if sender in circuit.nodes:
            totals[sender] = totals.get(sender, 0.0) + abs(score)
    grand = sum(totals.values())
    return {node: value / grand for node, value in totals.items()} if grand > 0 else {}


def mlp_rank_and_share(circuit: Circuit, layers: list[int]) -> tuple[int | None, float]:
    """The best rank (1 = the largest share) among the circuit's nodes of the MLPs at `layers`, and their
    summed share of the circuit's attribution (`node_attribution`). (None, 0.0) when none is a circuit node."""
    shares = node_attribution(circuit)
    ranked = sorted(shares, key=lambda node: -shares[node])
    present = [f"m{layer}" for layer in layers if f"m{layer}" in shares]
    if not present:
        return None, 0.0
    return min(ranked.index(node) + 1 for node in present), sum(shares[node] for node in present)


def _node_keep(values: torch.Tensor, graph: Graph, selection: str, top_n: int, threshold: float | None) -> torch.Tensor:
    if selection == "top-n":
        return node_circuit(values, graph, top_n)
    if selection == "threshold" and threshold is not None:
        return node_circuit(values, graph, int((values[1:].abs() >= threshold).sum()))
    raise ValueError("node-level circuits take top-n or threshold (with a threshold) selection")


def discover(bridge: Any, model: torch.nn.Module, arch: Any, batch: PairBatch, answer: str,
             top_n: int = DEFAULT_TOP_N, evaluate: bool = True, *, method: str = "eap", ablation: str = "corrupted",
             metric: str = "logprob", selection: str = "top-n", threshold: float | None = None,
             level: str = "edge", ig_steps: int = DEFAULT_IG_STEPS, prune_dead: bool = True,
             reference: PairBatch | None = None, graph: str = DEFAULT_GRAPH) -> Circuit:
    """Scores, the selected edges (or top_n nodes at level='node'), and optionally the circuit's faithfulness.

    graph: 'ungrouped' (one k/v receiver per query head, as EAP-IG and MIB) or 'grouped' (circuits/graph.py)."""
    g = Graph.of(arch, graph)
    measure = as_metric(metric)
    common = dict(metric=measure, ablation=ablation, reference=reference, steps=ig_steps)
    node_values = None
    if level == "node" and method == "exact":
        node_values = attribute(bridge, model, arch, g, batch, method, level="node", **common)
        scores = node_values[:, None].expand(g.n_upstream, g.n_receivers)
    else:
        scores = attribute(bridge, model, arch, g, batch, method, level="edge", **common)
        node_values = node_scores(scores) if level == "node" else None
    if level == "node":
        keep = _node_keep(node_values, g, selection, top_n, threshold)
    elif level == "edge":
        keep = select_edges(scores, g, selection, top_n, threshold)
    else:
        raise ValueError(f"level must be 'edge' or 'node', not '{level}'")
    n_selected = int(keep.sum())
    if prune_dead:  # as EAP-IG's apply_topn(prune=True) and evaluate_graph: edges off input -> logits paths go
        keep = prune(keep, g)
    up, recv = keep.nonzero(as_tuple=True)
    values = scores[up, recv].tolist()
    edges = {g.edge_name(u, r): v for u, r, v in zip(up.tolist(), recv.tolist(), values)}
    metrics = circuit_metrics(bridge, model, arch, g, batch, keep, measure.name, ablation, reference) if evaluate else {}
    settings = {"top_n": top_n, "threshold": threshold, "pruned": prune_dead, "n_selected": n_selected,
                "shape": {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "d_model": arch.d_model},
                "ig_steps": ig_steps if method.startswith("eap-ig") else None}
    nodes_scored = ({g.upstream_names[i]: float(v) for i, v in enumerate(node_values.tolist())}
                    if node_values is not None else {})
    return Circuit(method, answer, edges, circuit_nodes(keep, g), g.n_edges, metrics,
                   ablation=ablation, metric=measure.name, selection=selection, level=level,
                   settings=settings, node_scores=nodes_scored, graph=g.kind, scores=scores.detach().cpu())


def evaluate_circuit(bridge: Any, model: torch.nn.Module, arch: Any, circuit: Circuit, batch: PairBatch,
                     reference: PairBatch | None = None) -> dict[str, float]:
    """The circuit's metrics on another batch (e.g. held-out prompts), under its own graph, ablation and
    metric: out-of-sample faithfulness when the batch was not used to find it."""
    g = Graph.of(arch, circuit.graph)
    keep = g.mask_of(circuit.edges).to(batch.clean_ids.device)
    return circuit_metrics(bridge, model, arch, g, batch, keep, circuit.metric, circuit.ablation, reference)


def jaccard(a: set[str] | list[str], b: set[str] | list[str]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(pre: Circuit, post: Circuit) -> dict[str, float]:
    return {"edge_jaccard": jaccard(pre.edges, post.edges), "node_jaccard": jaccard(pre.nodes, post.nodes)}
