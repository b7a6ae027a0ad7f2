"""Exact activation patching: one forward pass per edge (or per node), for validating attributions.

score(u -> r) = sum over rows of  m(clean run with edge u -> r alone ablated) - m(clean run),
the quantity EAP and EAP-IG approximate to first order (Syed et al. 2023; EAP-IG's `exact`).
The ablated edge carries the ablation's value (circuits/ablation.py) through the same EdgePatcher that
evaluates circuits. At node level a node's score ablates all of its outgoing edges at once.
Cost: one forward per edge, so only for small graphs (the tiny test models) or a sample of edges.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from circuits.ablation import ablated_outputs
from circuits.activations import PairBatch
from circuits.evaluate import patched_logits
from circuits.graph import Graph
from circuits.metrics import Metric, prepared_metric
from lmview.arch import ArchSpec


def _only(graph: Graph, sender: int, receiver: int | None = None) -> torch.Tensor:
    """A boolean edge set: one edge, or (receiver None) all of a sender's outgoing edges."""
    chosen = torch.zeros(graph.n_upstream, graph.n_receivers, dtype=torch.bool)
    chosen[sender, slice(None) if receiver is None else receiver] = True
    return chosen


def _effects(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
             ablated_sets: Iterable[torch.Tensor], metric: str | Metric, ablation: str,
             reference: PairBatch | None) -> torch.Tensor:
    """For each boolean [n_upstream, n_receivers] set of edges to ablate: the change in the summed metric."""
    with torch.no_grad():
        clean_logits = bridge.run_with_hooks(batch.clean_ids, fwd_hooks=[], attention_mask=batch.attention_mask)
        ablated, corrupt_logits = ablated_outputs(bridge, graph, arch, model, batch, ablation, reference)
        measure = prepared_metric(bridge, batch, metric, clean_logits=clean_logits, corrupt_logits=corrupt_logits)
        base = measure(clean_logits, batch).sum()
        edges = graph.edge_mask.to(ablated.device)
        out = [measure(patched_logits(bridge, model, arch, graph, batch, edges & ~drop.to(edges.device), ablated),
                       batch).sum() - base for drop in ablated_sets]
    return torch.stack(out) if out else torch.zeros(0)


def exact_edge_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                      metric: str | Metric = "logprob", ablation: str = "corrupted", reference: PairBatch | None = None,
                      edges: torch.Tensor | None = None) -> torch.Tensor:
    """[n_upstream, n_receivers] exact effects of the given edges ([E, 2] index pairs; default all edges)."""
    pairs = graph.edge_mask.nonzero() if edges is None else edges
    effects = _effects(bridge, model, arch, graph, batch, (_only(graph, u, r) for u, r in pairs.tolist()),
                       metric, ablation, reference)
    scores = torch.zeros(graph.n_upstream, graph.n_receivers, device=effects.device)
    if len(pairs):
        scores[pairs[:, 0], pairs[:, 1]] = effects
    return scores


def exact_node_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                      metric: str | Metric = "logprob", ablation: str = "corrupted",
                      reference: PairBatch | None = None) -> torch.Tensor:
    """[n_upstream]: the effect of ablating every outgoing edge of each sender."""
    return _effects(bridge, model, arch, graph, batch, (_only(graph, u) for u in range(graph.n_upstream)),
                    metric, ablation, reference)
