"""Evaluating a circuit by patching: edges outside it carry corrupted activations.

Each receiver reads  x + sum_{u outside circuit} (corrupted_u - current_u),  where x
is its actual input in the patched run and current_u is sender u's output in that
same run. With every edge kept this is the clean run; with none, the corrupted run.
`corrupted_u` is whatever the ablation gives (circuits/ablation.py): the corrupted prompt's
output (default), the reference-set mean, or zero. Faithfulness is normalised as
(circuit - ablated) / (clean - ablated) (MIB), where "ablated" is the run with
every edge ablated: the corrupted run for corrupted patching, the all-edges-patched run otherwise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from circuits.ablation import ablated_outputs
from circuits.activations import PairBatch, SenderCapture, embed_hooks
from circuits.curve import normalized_faithfulness
from circuits.graph import Graph
from circuits.metrics import Metric, prepared_metric
from circuits.ungroup import kv_layout
from lmview.arch import ArchSpec


class EdgePatcher(SenderCapture):
    """A SenderCapture that also rewrites every receiver's input."""

    def __init__(self, graph: Graph, arch: ArchSpec, model: torch.nn.Module, corrupt: torch.Tensor,
                 patched_edges: torch.Tensor):
        """`patched_edges`: [n_upstream, n_receivers] (1 = corrupted), or [V, n_upstream, n_receivers] for V
        variants of the graph in one pass, the batch then being the prompts repeated V times (variant-major)."""
        super().__init__(graph, arch, model)
        patched = patched_edges if patched_edges.dim() == 3 else patched_edges.unsqueeze(0)
        self.variants = patched.shape[0]
        self.corrupt = corrupt  # [n_upstream, B, P, D], shared by the variants
        self.weights = patched.to(corrupt.dtype)
        self.patched = patched.bool().cpu()  # read on the host to pick the senders each receiver needs
        n_upstream, rows, *rest = corrupt.shape
        self.outputs = corrupt.new_zeros((n_upstream, self.variants * rows, *rest))
        self.resid: dict[int, torch.Tensor] = {}
        self.embeds: dict[str, torch.Tensor] = {}

    def _patch(self, receivers: slice) -> torch.Tensor | None:
        """sum_u w[u, r] (corrupted_u - current_u) for each receiver r: [R, B, P, D] (B: all rows of all
        variants); None when no edge into these receivers is patched. Only the senders with a patched edge into
        them (in any variant) enter the sum."""
        senders = self.patched[:, :, receivers].any(2).any(0).nonzero().flatten()
        if len(senders) == 0:
            return None
        senders = senders.to(self.weights.device)
        weights = self.weights[:, senders, receivers]  # [V, S, R]
        if self.variants == 1:
            return torch.einsum("ur,ubpd->rbpd", weights[0], self.corrupt[senders] - self.outputs[senders])
        current = self.outputs[senders].unflatten(1, (self.variants, self.corrupt.shape[1]))  # [S, V, B, P, D]
        return torch.einsum("vsr,svbpd->rvbpd", weights, self.corrupt[senders].unsqueeze(1) - current).flatten(1, 2)

    def _embed(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        self.embeds[hook.name] = act
        self.outputs[0] = sum(self.embeds.values())
        return act

    def _keep_resid(self, layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            self.resid[layer] = act
            return act

        return fn

    def _qkv(self, layer: int, port: str) -> Callable:
        w = dict(zip("qkv", self.arch.qkv_weights(self.model, layer)))[port]
        g = self.graph
        first = {"q": g.q_index(layer, 0), "k": g.k_index(layer, 0), "v": g.v_index(layer, 0)}[port]
        norm = self.arch.ln_attn(self.model, layer)

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            resid = self.resid[layer]
            delta = self._patch(slice(first, first + w.shape[0]))  # [H, B, P, D]
            if delta is None:
                return act
            shift = norm(resid.unsqueeze(0) + delta) - norm(resid).unsqueeze(0)
            moved = torch.einsum("hbpd,hde->bphe", shift, w)  # hook_k/v may be [B, P, heads * d_head]
            return act + moved.reshape(act.shape)

        return fn

    def _add_patch(self, receiver: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            delta = self._patch(slice(receiver, receiver + 1))
            return act if delta is None else act + delta[0]

        return fn

    def hooks(self, bridge: Any) -> list[tuple[str, Callable]]:
        hooks: list[tuple[str, Callable]] = [(name, self._embed) for name in embed_hooks(bridge)]
        for layer in range(self.arch.n_layers):
            hooks.append((f"blocks.{layer}.ln1.hook_in", self._keep_resid(layer)))
            hooks += [(f"blocks.{layer}.attn.hook_{p}", self._qkv(layer, p)) for p in "qkv"]
            hooks.append((f"blocks.{layer}.attn.hook_z", self._heads(layer)))
            hooks.append((f"blocks.{layer}.ln2.hook_in", self._add_patch(self.graph.mlp_in_index(layer))))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp(layer)))
        hooks.append(("ln_final.hook_in", self._add_patch(self.graph.logits_index)))
        return hooks


@torch.no_grad()
def patched_logits(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                   keep: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Logits of the clean prompts with every edge outside `keep` fed its corrupted sender output. A stack of
    V masks [V, n_upstream, n_receivers] runs the V circuits in one pass: logits [V * B, ...], variant-major."""
    patched = graph.edge_mask.to(keep.device) & ~keep
    repeats = patched.shape[0] if patched.dim() == 3 else 1
    ids, mask = batch.clean_ids, batch.attention_mask
    if repeats > 1:
        ids, mask = ids.repeat(repeats, 1), None if mask is None else mask.repeat(repeats, 1)
    with kv_layout(model, arch, graph):
        patcher = EdgePatcher(graph, arch, model, corrupt, patched.to(corrupt.device))
        return bridge.run_with_hooks(ids, fwd_hooks=patcher.hooks(bridge), attention_mask=mask)


@torch.no_grad()
def circuit_metrics(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                    keep: torch.Tensor, metric: str | Metric = "logprob", ablation: str = "corrupted",
                    reference: PairBatch | None = None) -> dict[str, float]:
    """Clean, ablated ("corrupted") and circuit metric (mean over rows) and normalised faithfulness."""
    clean_logits = bridge.run_with_hooks(batch.clean_ids, fwd_hooks=[], attention_mask=batch.attention_mask)
    ablated, corrupt_logits = ablated_outputs(bridge, graph, arch, model, batch, ablation, reference)
    if corrupt_logits is None:
        corrupt_logits = patched_logits(bridge, model, arch, graph, batch, torch.zeros_like(keep), ablated)
    measure = prepared_metric(bridge, batch, metric, clean_logits=clean_logits,
                              corrupt_logits=corrupt_logits if ablation == "corrupted" else None)
    circuit_logits = patched_logits(bridge, model, arch, graph, batch, keep, ablated)
    values = torch.stack([measure(x, batch).mean() for x in (clean_logits, corrupt_logits, circuit_logits)])
    clean, corrupted, circuit = values.tolist()
    faith = normalized_faithfulness(circuit, clean, corrupted)  # NaN (undefined) when clean ~ corrupted
    return {"metric_clean": clean, "metric_corrupted": corrupted, "metric_circuit": circuit, "faithfulness": faith}
