"""Circuits: top-n edge selection, discovery for one fact, overlap between two circuits."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuits.activations import PairBatch
from circuits.attribute import eap_scores
from circuits.evaluate import circuit_metrics
from circuits.graph import Graph

DEFAULT_TOP_N = 300


@dataclass
class Circuit:
    method: str
    answer: str
    edges: dict[str, float]  # "sender->receiver" -> attribution score
    nodes: list[str]
    n_graph_edges: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))


def top_edges(scores: torch.Tensor, graph: Graph, n: int) -> torch.Tensor:
    """Boolean [n_upstream, n_receivers] mask of the n existing edges with largest |score|."""
    flat = scores.abs().masked_fill(~graph.edge_mask.to(scores.device), -1.0).flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(min(n, graph.n_edges)).indices] = True
    return keep.view_as(scores)


def circuit_nodes(keep: torch.Tensor, graph: Graph) -> list[str]:
    up, recv = keep.nonzero(as_tuple=True)
    names = {graph.upstream_names[i] for i in up.tolist()} | {graph.receiver_nodes[j] for j in recv.tolist()}
    return sorted(names)


def discover(bridge: Any, model: torch.nn.Module, arch: Any, batch: PairBatch, answer: str,
             top_n: int = DEFAULT_TOP_N, evaluate: bool = True) -> Circuit:
    """EAP scores, the top-n edges, and (optionally) the circuit's faithfulness."""
    graph = Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)
    scores = eap_scores(bridge, model, arch, graph, batch)
    keep = top_edges(scores, graph, top_n)
    up, recv = keep.nonzero(as_tuple=True)
    values = scores[up, recv].tolist()
    edges = {graph.edge_name(u, r): v for u, r, v in zip(up.tolist(), recv.tolist(), values)}
    metrics = circuit_metrics(bridge, model, arch, graph, batch, keep) if evaluate else {}
    return Circuit("eap", answer, edges, circuit_nodes(keep, graph), graph.n_edges, metrics)


def jaccard(a: set[str] | list[str], b: set[str] | list[str]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(pre: Circuit, post: Circuit) -> dict[str, float]:
    return {"edge_jaccard": jaccard(pre.edges, post.edges), "node_jaccard": jaccard(pre.nodes, post.nodes)}
