"""Edge attribution patching (EAP; Syed et al. 2023, as used by Yao et al. 2024).

score(u -> r) = (corrupted - clean output of sender u) . d metric / d (input of receiver r),
summed over batch rows and positions. Cost: one corrupted forward without gradients,
one clean forward and one backward, then one matrix product.

A head's q/k/v input is the residual stream *before* its layer norm, as in
EAP-IG's split-input graph; its gradient is the layer norm's vector-Jacobian
product applied to the gradient that reaches that head's projection alone.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from bench.arch import ArchSpec
from circuits.activations import PairBatch, answer_logprob, run_capture
from circuits.graph import Graph


class ReceiverGrads:
    """Captures, in a clean forward, what is needed for every receiver's input gradient."""

    def __init__(self, arch: ArchSpec):
        self.arch = arch
        self.resid: dict[int, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def _keep_grad(self, key: str) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            # a fresh tensor, so only this receiver's uses (not e.g. the residual skip) reach the hook
            act = act.clone()
            act.register_hook(lambda g: self.grads.__setitem__(key, g))
            return act

        return fn

    def _keep_resid(self, layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            self.resid[layer] = act.detach()
            return act

        return fn

    def hooks(self) -> list[tuple[str, Callable]]:
        hooks: list[tuple[str, Callable]] = [("hook_embed", lambda act, hook: act.detach().requires_grad_(True))]
        for layer in range(self.arch.n_layers):
            hooks.append((f"blocks.{layer}.ln1.hook_in", self._keep_resid(layer)))
            for port in ("q", "k", "v"):
                hooks.append((f"blocks.{layer}.attn.hook_{port}", self._keep_grad(f"{layer}.{port}")))
            hooks.append((f"blocks.{layer}.ln2.hook_in", self._keep_grad(f"{layer}.mlp")))
        hooks.append(("ln_final.hook_in", self._keep_grad("logits")))
        return hooks

    def attention_input_grads(self, model: torch.nn.Module, layer: int) -> torch.Tensor:
        """[H + 2K, B, P, D]: gradient at each q (per head), k and v (per kv group) input, pre-norm."""
        w_q, w_k, w_v = self.arch.qkv_weights(model, layer)
        normed = torch.cat([
            torch.einsum("bphe,hde->hbpd", self.grads[f"{layer}.{port}"], w)
            for port, w in (("q", w_q), ("k", w_k), ("v", w_v))
        ])
        resid = self.resid[layer].unsqueeze(0).expand(normed.shape[0], -1, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.arch.ln_attn(model, layer)(resid)
            (grad,) = torch.autograd.grad(out, resid, normed)
        return grad

    def stacked(self, model: torch.nn.Module, graph: Graph) -> torch.Tensor:
        """[n_receivers, B, P, D] in the graph's receiver order."""
        parts = []
        for layer in range(self.arch.n_layers):
            parts.append(self.attention_input_grads(model, layer))
            parts.append(self.grads[f"{layer}.mlp"].unsqueeze(0))
        parts.append(self.grads["logits"].unsqueeze(0))
        return torch.cat(parts)


def eap_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch) -> torch.Tensor:
    """Edge scores [n_upstream, n_receivers] (zero where no edge exists)."""
    with torch.no_grad():
        _, corrupt = run_capture(bridge, graph, arch, model, batch.corrupt_ids, batch.attention_mask)
    receivers = ReceiverGrads(arch)
    with torch.enable_grad():
        logits, clean = run_capture(bridge, graph, arch, model, batch.clean_ids, batch.attention_mask,
                                    extra_hooks=receivers.hooks())
        answer_logprob(logits, batch).sum().backward()
    with torch.no_grad():
        grads = receivers.stacked(model, graph) * batch.attention_mask[None, :, :, None]
        delta = (corrupt - clean).flatten(1)
        scores = delta.float() @ grads.flatten(1).float().T
        return scores * graph.edge_mask.to(scores.device)
