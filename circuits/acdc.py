"""ACDC edge discovery (Conmy et al. 2023) as the Knowledge Circuits code runs it (zjunlp/KnowledgeCircuits,
`acdc/TLACDCExperiment.py`, `acdc/main.py`, `acdc/run.sh`: zero ablation, `match_nll`, threshold 0.01).

Start from the full graph. Visit the receivers from the logits backwards (`visit_order`); for each one, remove
its incoming edges one at a time (`incoming_order`): the receiver then reads the ablated value of that sender
instead of the current one, and the metric m (lower is better, e.g. match-nll, averaged over the prompts) is
measured with every edge removed so far. If m(after) - m(current) < threshold the edge stays removed and the
current metric becomes m(after); else the edge is put back. The difference is signed (KC's runs do not pass
`--abs-value-threshold`) and taken against the current metric, not the full model's.

As in the reference:
- Order. Its graph is visited in the reverse of TransformerLens's hook order: the logits
  (`blocks.{L-1}.hook_resid_post`), then per layer from the last: the MLP input; the v, k and q of every
  head (heads from the last index down); then the v, k and q inputs (same head order). A receiver's
  incoming edges come by sender layer from the latest, within a layer the MLP first and then the heads in
  increasing index (`--indices-mode reverse`), the input (`blocks.0.hook_resid_pre`) last.
- q/k/v receivers are tested twice. The reference's graph has an edge from each head's q (k, v) input to
  its q (k, v), tested before the input's own edges; removing it equals removing every incoming edge of the
  receiver at once (the head then reads the ablated run's q). Here that is one test of the whole receiver;
  if it passes, the receiver's edges are gone and are not tested one by one.
- Nodes with no path to the logits are dropped: when a node (head, MLP) is reached and none of its outgoing
  edges is left, its receivers lose all incoming edges without a test (`current_node_connected`).

Differences: the reference measures the metric again at the start of every receiver and after every sender
name (the same value, the patching being deterministic); here each forward pass is a test, so `n_forward` is
1 (the full graph) + the number of tests. The reference counts each q/k/v input -> q/k/v edge that stays
as an edge (`n_edges_reference_count`); the graph here has no such edges (`n_edges`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from circuits.graph import Graph

ACDC_THRESHOLD = 0.01  # KC's acdc/run.sh


def check_threshold(threshold: float) -> float:
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"--acdc-threshold must be 0 or more (KC: {ACDC_THRESHOLD}), not {threshold}")
    return threshold


@dataclass(frozen=True)
class Visit:
    """One receiver step: `whole` tests removing all of its incoming edges at once (q/k/v receivers)."""

    receiver: int
    whole: bool = False


def visit_order(graph: Graph) -> list[Visit]:
    """The receivers in the reference's reverse topological order, with the q/k/v whole-receiver tests."""
    visits = [Visit(graph.logits_index)]
    for layer in reversed(range(graph.n_layers)):
        visits.append(Visit(graph.mlp_in_index(layer)))
        ports = ((graph.v_index, graph.n_kv_heads), (graph.k_index, graph.n_kv_heads), (graph.q_index, graph.n_heads))
        for whole in (True, False):
            visits += [Visit(index(layer, i), whole) for index, n in ports for i in reversed(range(n))]
    return visits


def incoming_order(graph: Graph, receiver: int) -> list[int]:
    """The senders of `receiver` in the order the reference tests them: by layer from the latest, the MLP
    before the heads (heads in increasing index), the input last."""
    n_senders = graph.senders_before(receiver)
    order: list[int] = []
    for layer in reversed(range(graph.n_layers)):
        block = [graph.mlp_index(layer)] + [graph.head_index(layer, h) for h in range(graph.n_heads)]
        order += [u for u in block if u < n_senders]
    return order + [0]


def cumulative_removals(keep: torch.Tensor, edges: list[tuple[int, int]]) -> list[torch.Tensor]:
    """One mask per edge: `keep` with that edge and every edge before it in `edges` removed."""
    trials: list[torch.Tensor] = []
    for sender, receiver in edges:
        trials.append((trials[-1] if trials else keep).clone())
        trials[-1][sender, receiver] = False
    return trials


@dataclass
class AcdcResult:
    keep: torch.Tensor  # [n_upstream, n_receivers] bool: the circuit's edges
    effects: torch.Tensor  # [n_upstream, n_receivers] m(edge removed) - m(current); NaN where not tested
    threshold: float
    metric_full: float
    metric_final: float
    n_forward: int  # forward passes: 1 for the full graph, then one per test
    n_edge_tests: int
    n_receiver_tests: int  # whole q/k/v receiver tests
    n_receivers_removed_whole: int
    n_dropped_receivers: int  # receivers of nodes with no path to the logits
    seconds: float
    speculate: int = 1  # edge tests per batched forward pass (1: one at a time)
    n_passes: int = 0  # forward passes run: with speculate > 1, each holds up to `speculate` tests
    n_discarded: int = 0  # speculative tests thrown away (after an edge that stayed)

    @property
    def n_edges(self) -> int:
        return int(self.keep.sum())

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "n_edges": self.n_edges,
                "n_edges_reference_count": self.n_edges + self.n_receiver_tests - self.n_receivers_removed_whole,
                "n_forward": self.n_forward, "n_edge_tests": self.n_edge_tests,
                "n_receiver_tests": self.n_receiver_tests,
                "n_receivers_removed_whole": self.n_receivers_removed_whole,
                "n_dropped_receivers": self.n_dropped_receivers, "speculate": self.speculate,
                "n_passes": self.n_passes, "n_discarded": self.n_discarded, "metric_full": self.metric_full,
                "metric_final": self.metric_final, "seconds": self.seconds}


def acdc(measure: Callable[[torch.Tensor], float], graph: Graph, threshold: float = ACDC_THRESHOLD, *,
         measure_many: Callable[[list[torch.Tensor]], list[float]] | None = None, speculate: int = 1,
         progress: bool = True) -> AcdcResult:
    """ACDC over `graph`. `measure(keep)` is the metric (lower is better) with only `keep`'s edges clean, e.g.
    the mean match-nll of `ScoringSet.with_edges(keep)`.

    With `measure_many` (the metric of several circuits in one pass) and `speculate` k > 1, a receiver's next k
    edge tests run together, test j with the edges of tests 1..j all removed: what the one-at-a-time loop
    measures as long as each of them is removed. The first edge that stays ends the group, the tests after it
    are discarded and run again from the state with that edge kept. The decisions are those of the
    one-at-a-time loop up to floating-point differences between a batched and a single forward pass."""
    check_threshold(threshold)
    if speculate < 1:
        raise ValueError(f"the speculative batch (--acdc-batch) must be at least 1, not {speculate}")
    if speculate > 1 and measure_many is None:
        raise ValueError("speculative ACDC needs measure_many")
    start = time.perf_counter()
    keep = graph.edge_mask.clone()
    effects = torch.full(keep.shape, float("nan"))
    owners = graph.receiver_owners[:, : graph.n_upstream]
    current = measure(keep)
    full, n_forward = current, 1
    counts = {"edge": 0, "whole": 0, "removed_whole": 0, "dropped": 0, "passes": 1, "discarded": 0}
    visits = visit_order(graph)
    bar = tqdm(visits, desc="acdc receivers", unit="receiver", disable=not progress, mininterval=5)
    for visit in bar:
        r = visit.receiver
        if not keep[:, r].any():
            continue
        if r != graph.logits_index and not keep[owners[r]].any():  # its node feeds nothing that is left
            keep[:, r] = False
            counts["dropped"] += 1
            continue
        if visit.whole:
            trial = keep.clone()
            trial[:, r] = False
            value = measure(trial)
            n_forward += 1
            counts["whole"] += 1
            counts["passes"] += 1
            if value - current < threshold:
                keep, current = trial, value
                counts["removed_whole"] += 1
            continue
        pending = [u for u in incoming_order(graph, r) if keep[u, r]]
        while pending:
            group = pending[:speculate]
            trials = cumulative_removals(keep, [(u, r) for u in group])
            values = measure_many(trials) if len(trials) > 1 else [measure(trials[0])]
            counts["passes"] += 1
            for j, (u, value) in enumerate(zip(group, values)):
                n_forward += 1
                counts["edge"] += 1
                effects[u, r] = value - current
                if value - current < threshold:
                    keep[u, r], current = False, value
                else:
                    counts["discarded"] += len(group) - j - 1
                    group = group[: j + 1]
                    break
            pending = pending[len(group):]
        bar.set_postfix(edges=int(keep.sum()), metric=f"{current:.4f}", forwards=n_forward, refresh=False)
    bar.set_postfix(edges=int(keep.sum()), metric=f"{current:.4f}", forwards=n_forward)
    bar.close()
    return AcdcResult(keep, effects, threshold, full, current, n_forward, counts["edge"], counts["whole"],
                      counts["removed_whole"], counts["dropped"], time.perf_counter() - start, speculate,
                      counts["passes"], counts["discarded"])
