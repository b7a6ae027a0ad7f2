"""Circuits: discovery for one fact (method, ablation, metric, level, selection), overlap between two circuits.

discover() = attribute (circuits/attribute.py, circuits/exact.py) -> select (circuits/selection.py:
top-n, threshold or greedy edges, or top-n nodes; optionally pruned to input -> logits paths) ->
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
from circuits.graph import Graph
from circuits.metrics import as_metric
from circuits.selection import node_circuit, prune, select_edges, top_edges  # noqa: F401  (top_edges re-exported)

DEFAULT_TOP_N = 300


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))


def circuit_nodes(keep: torch.Tensor, graph: Graph) -> list[str]:
    up, recv = keep.nonzero(as_tuple=True)
    names = {graph.upstream_names[i] for i in up.tolist()} | {graph.receiver_nodes[j] for j in recv.tolist()}
    return sorted(names)


def _node_keep(values: torch.Tensor, graph: Graph, selection: str, top_n: int, threshold: float | None) -> torch.Tensor:
    if selection == "top-n":
        return node_circuit(values, graph, top_n)
    if selection == "threshold" and threshold is not None:
        return node_circuit(values, graph, int((values[1:].abs() >= threshold).sum()))
    raise ValueError("node-level circuits take top-n or threshold (with a threshold) selection")


def discover(bridge: Any, model: torch.nn.Module, arch: Any, batch: PairBatch, answer: str,
             top_n: int = DEFAULT_TOP_N, evaluate: bool = True, *, method: str = "eap", ablation: str = "corrupted",
             metric: str = "logprob", selection: str = "top-n", threshold: float | None = None,
             level: str = "edge", ig_steps: int = DEFAULT_IG_STEPS, prune_dead: bool = False,
             reference: PairBatch | None = None) -> Circuit:
    """Scores, the selected edges (or top_n nodes at level='node'), and optionally the circuit's faithfulness."""
    graph = Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)
    measure = as_metric(metric)
    common = dict(metric=measure, ablation=ablation, reference=reference, steps=ig_steps)
    node_values = None
    if level == "node" and method == "exact":
        node_values = attribute(bridge, model, arch, graph, batch, method, level="node", **common)
        scores = node_values[:, None].expand(graph.n_upstream, graph.n_receivers)
    else:
        scores = attribute(bridge, model, arch, graph, batch, method, level="edge", **common)
        node_values = node_scores(scores) if level == "node" else None
    if level == "node":
        keep = _node_keep(node_values, graph, selection, top_n, threshold)
    elif level == "edge":
        keep = select_edges(scores, graph, selection, top_n, threshold)
    else:
        raise ValueError(f"level must be 'edge' or 'node', not '{level}'")
    if prune_dead:
        keep = prune(keep, graph)
    up, recv = keep.nonzero(as_tuple=True)
    values = scores[up, recv].tolist()
    edges = {graph.edge_name(u, r): v for u, r, v in zip(up.tolist(), recv.tolist(), values)}
    metrics = circuit_metrics(bridge, model, arch, graph, batch, keep, measure.name, ablation, reference) if evaluate else {}
    settings = {"top_n": top_n, "threshold": threshold, "pruned": prune_dead,
                "ig_steps": ig_steps if method.startswith("eap-ig") else None}
    nodes_scored = ({graph.upstream_names[i]: float(v) for i, v in enumerate(node_values.tolist())}
                    if node_values is not None else {})
    return Circuit(method, answer, edges, circuit_nodes(keep, graph), graph.n_edges, metrics,
                   ablation=ablation, metric=measure.name, selection=selection, level=level,
                   settings=settings, node_scores=nodes_scored)


def jaccard(a: set[str] | list[str], b: set[str] | list[str]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(pre: Circuit, post: Circuit) -> dict[str, float]:
    return {"edge_jaccard": jaccard(pre.edges, post.edges), "node_jaccard": jaccard(pre.nodes, post.nodes)}
