"""Turning scores into a circuit: top-n, threshold and greedy selection, node-level circuits, pruning.

All selections rank by |score| over existing edges (top-n can also rank by signed score, for MIB's CPR)
and return a boolean [n_upstream, n_receivers] mask.

- `top-n`: the n edges with largest |score|.
- `threshold`: every edge with |score| >= t.
- `greedy` (EAP-IG's greedy growth): start from the logits; repeatedly add the highest-|score| edge whose
  receiver belongs to a node already in the circuit, and add its sender, until n edges.
- node level: the n senders (heads, MLPs; the input always) with largest |node score|; the circuit is every
  edge from a kept sender to a receiver of a kept node or the logits, so all outgoing edges of a dropped
  node are ablated.
- `prune`: drop edges whose sender has no path from the input, or whose receiver's node has no path to
  the logits (EAP-IG's prune). A grouped k/v receiver leads to every query head of its group.
"""

from __future__ import annotations

import heapq

import torch

from circuits.graph import Graph

SELECTIONS = ("top-n", "threshold", "greedy")


def _ranked(scores: torch.Tensor, graph: Graph, absolute: bool = True) -> torch.Tensor:
    """|scores| (or the signed scores) with non-edges at -inf."""
    values = scores.abs() if absolute else scores
    return values.masked_fill(~graph.edge_mask.to(scores.device), -float("inf"))


def top_edges(scores: torch.Tensor, graph: Graph, n: int, absolute: bool = True) -> torch.Tensor:
    """Boolean [n_upstream, n_receivers] mask of the n existing edges with largest |score| (absolute=False:
    largest signed score, as MIB's CPR curve)."""
    flat = _ranked(scores, graph, absolute).flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(min(max(n, 0), graph.n_edges)).indices] = True
    return keep.view_as(scores)


def threshold_edges(scores: torch.Tensor, graph: Graph, threshold: float) -> torch.Tensor:
    return (scores.abs() >= threshold) & graph.edge_mask.to(scores.device)


def greedy_edges(scores: torch.Tensor, graph: Graph, n: int) -> torch.Tensor:
    """Grow from the logits: each step adds the best edge into the circuit's current nodes."""
    ranked = _ranked(scores, graph).cpu()
    owners = graph.receiver_owners
    keep = torch.zeros(graph.n_upstream, graph.n_receivers, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    opened_receivers: set[int] = set()
    in_circuit: set[int] = set()

    def open_node(node: int) -> None:
        """Make the incoming edges of `node` (a sender index, or n_upstream for the logits) candidates."""
        in_circuit.add(node)
        for receiver in owners[:, node].nonzero().flatten().tolist():
            if receiver in opened_receivers:
                continue
            opened_receivers.add(receiver)
            for sender in graph.edge_mask[:, receiver].nonzero().flatten().tolist():
                heapq.heappush(heap, (-float(ranked[sender, receiver]), sender, receiver))

    open_node(graph.n_upstream)
    added = 0
    while heap and added < n:
        _, sender, receiver = heapq.heappop(heap)
        keep[sender, receiver] = True
        added += 1
        if sender not in in_circuit:
            open_node(sender)
    return keep.to(scores.device)


def prune(keep: torch.Tensor, graph: Graph) -> torch.Tensor:
    """The edges of `keep` that lie on some input -> ... -> logits path."""
    edges = (keep & graph.edge_mask.to(keep.device)).cpu()
    owners = graph.receiver_owners.float()  # [R, N + 1]
    n_nodes = graph.n_upstream + 1
    reached = torch.zeros(n_nodes, dtype=torch.bool)  # reachable from the input
    reached[0] = True
    while True:
        fed = (edges & reached[: graph.n_upstream, None]).any(0)  # receivers with a reached sender
        grown = reached | ((owners * fed[:, None].float()).sum(0) > 0)
        if torch.equal(grown, reached):
            break
        reached = grown
    useful = torch.zeros(n_nodes, dtype=torch.bool)  # can reach the logits
    useful[graph.n_upstream] = True
    while True:
        receiver_useful = (owners @ useful.float()) > 0
        grown = useful.clone()
        grown[: graph.n_upstream] |= (edges & receiver_useful[None, :]).any(1)
        if torch.equal(grown, useful):
            break
        useful = grown
    receiver_useful = (owners @ (useful & reached).float()) > 0
    alive_senders = reached[: graph.n_upstream] & useful[: graph.n_upstream]
    return (edges & alive_senders[:, None] & receiver_useful[None, :]).to(keep.device)


def node_circuit(node_values: torch.Tensor, graph: Graph, n: int) -> torch.Tensor:
    """The edge mask of the node-level circuit made of the n senders with largest |node score| (input always)."""
    ranked = node_values.abs().cpu().clone()
    ranked[0] = float("inf")
    kept = torch.zeros(graph.n_upstream + 1, dtype=torch.bool)
    kept[ranked.topk(min(n + 1, graph.n_upstream)).indices] = True
    kept[graph.n_upstream] = True  # the logits
    receiver_kept = (graph.receiver_owners & kept[None, :]).any(1)
    return graph.edge_mask & kept[: graph.n_upstream, None] & receiver_kept[None, :]


def select_edges(scores: torch.Tensor, graph: Graph, selection: str = "top-n", n: int = 300,
                 threshold: float | None = None) -> torch.Tensor:
    if selection == "top-n":
        return top_edges(scores, graph, n)
    if selection == "greedy":
        return greedy_edges(scores, graph, n)
    if selection == "threshold":
        if threshold is None:
            raise ValueError("threshold selection needs a threshold")
        return threshold_edges(scores, graph, threshold)
    raise ValueError(f"unknown selection '{selection}'; choose from {', '.join(SELECTIONS)}")
