"""Edge attribution: EAP, EAP-IG over the inputs, and EAP-IG over each layer's activations.

With delta_u = (ablated - clean) output of sender u and g_r = d metric / d (input of receiver r),
summed over batch rows and real (unpadded) positions:

- `eap` (Syed et al. 2023, as used by Yao et al. 2024):  score(u -> r) = delta_u . g_r  at the clean input.
- `eap-ig` (Hanna et al. 2024, "EAP-IG-inputs"):  score(u -> r) = delta_u . (1/m) sum_{k=1..m} g_r(x_k),
  with the input embeddings x_k = x_ablated + (k/m)(x_clean - x_ablated). Differs from the EAP-IG code:
  a right Riemann sum (k = 1..m, so the k = m pass is the clean run and also records the clean sender
  outputs) where theirs is the left one (k = 0..m-1). Cost: one ablated forward and m forward+backward.
- `eap-ig-activations` (Hanna et al. 2024, "EAP-IG-activations"): for the senders of one layer block
  (the input; layer l's heads; layer l's MLP), the gradient is averaged over m passes in which only that
  block's output is moved from ablated to clean,  out_k = out_ablated + (k/m)(out_clean - out_ablated),
  and only that block's rows are scored from those passes. Differs from the EAP-IG code, which adds every
  pass's gradients to every row and divides by all passes. Cost: 1 + (2L + 1)(m - 1) forward+backward
  (the k = m pass is the clean run, shared by all blocks).

A head's q/k/v input is the residual stream *before* its layer norm, as in EAP-IG's split-input graph;
its gradient is the layer norm's vector-Jacobian product applied to the gradient that reaches that
head's projection alone. That VJP is computed once per layer for all of its q/k/v receivers, in closed form
for LayerNorm and RMSNorm (`norm_vjp`; through autograd for any other norm), and only at the live positions.
Memory: scores are accumulated layer by layer during the backward pass, as each layer's receiver gradients
arrive (one product per layer); only delta is kept whole, as [n_upstream, N, D] over the N live positions
(real tokens where some sender's delta is non-zero). EAP-IG sums each layer's receiver gradients over its
steps (at most [n_receivers, N, D] held between passes) and scores the sum once, in the last step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from circuits.ablation import ablated_outputs
from circuits.activations import PairBatch, run_capture
from circuits.graph import Graph
from circuits.metrics import Metric, prepared_metric
from circuits.ungroup import kv_layout
from lmview.arch import ArchSpec

METHODS = ("eap", "eap-ig", "eap-ig-activations", "exact")
DEFAULT_IG_STEPS = 5


def norm_parameters(norm: torch.nn.Module) -> tuple[torch.Tensor | None, float, bool] | None:
    """(weight, eps, centered) of a norm whose VJP `norm_vjp` computes in closed form: torch LayerNorm
    (centered) or Llama's RMSNorm, bare or inside a TransformerLens bridge; None for any other norm."""
    if getattr(norm, "uses_weight_offset", False):  # Gemma-style 1 + weight: not handled here
        return None
    inner = getattr(norm, "original_component", None)
    inner = norm if inner is None else inner
    if isinstance(inner, torch.nn.LayerNorm) and len(inner.normalized_shape) == 1:
        return inner.weight, float(inner.eps), True
    if type(inner).__name__ == "LlamaRMSNorm":
        return inner.weight, float(inner.variance_epsilon), False
    return None


def norm_vjp(x: torch.Tensor, grad: torch.Tensor, eps: float, centered: bool,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """The vector-Jacobian product of y = weight * norm(x) over the last dimension, in float32.

    x [..., D] (broadcast against grad [..., D]); norm is RMSNorm, x / rms(x), or LayerNorm (centered),
    (x - mean x) / std(x). With n = norm(x), r = 1 / rms(x - mean) and gw = grad * weight:
    dx = r (gw - mean(gw) - n mean(gw n)); the centred term is 0 for RMSNorm. weight=None: grad is gw."""
    x = x.float()
    if centered:
        x = x - x.mean(-1, keepdim=True)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    n = x * r
    gw = grad.float() if weight is None else grad.float() * weight.float()
    if centered:
        gw = gw - gw.mean(-1, keepdim=True)
    return (gw - n * (gw * n).mean(-1, keepdim=True)) * r


class EdgeScoreAccumulator:
    """Backward hooks that add  weight * delta[rows] . g_r  into scores as each receiver's gradient arrives.

    With `buffer` set, a pass's receiver gradients are summed into `grad_sum` instead; the next pass without
    it scores their sum with its own gradients in one product (EAP-IG: delta is the same for every step, so
    sum_k delta . g_k = delta . sum_k g_k and the products run once, not once per step)."""

    def __init__(self, arch: ArchSpec, graph: Graph, model: torch.nn.Module, scores: torch.Tensor,
                 position_mask: torch.Tensor):
        self.arch, self.graph, self.model, self.scores = arch, graph, model, scores
        self.position_mask = position_mask.flatten().bool()  # [B * P]
        self.delta: torch.Tensor | None = None  # [n_upstream, N, D] float32 at the N live positions
        self.live: torch.Tensor | None = None  # [N] indices into B * P
        self.rows = (0, graph.n_upstream)
        self.weight = 1.0
        self.buffer = False
        self.grad_sum: dict[int, torch.Tensor] = {}  # first receiver -> summed gradients [R, N, D]
        self.resid: dict[int, torch.Tensor] = {}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}

    def set_delta(self, delta: torch.Tensor) -> None:
        """Keeps delta [n_upstream, B, P, D] only at live positions: real (unpadded) tokens where some sender's
        delta is non-zero (with corrupted-input patching, positions before the first corrupted token have
        delta exactly 0). Dropping the others changes no score and shortens every product."""
        flat = delta.flatten(1, 2)
        moved = ((flat.amax(dim=2) != 0) | (flat.amin(dim=2) != 0)).any(dim=0)  # no [n, B*P, D] bool copy
        self.live = (self.position_mask & moved).nonzero().flatten()
        self.delta = flat.index_select(1, self.live).float()

    def live_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, P, ...] -> [N, ...] at the live positions."""
        assert self.live is not None
        return t.flatten(0, 1).index_select(0, self.live)

    def collect(self, layer: int, part: str, grads: torch.Tensor) -> None:
        """Holds a layer's receiver gradients until all four (q, k, v, MLP) have arrived, then finishes the
        q/k/v ones with one layer-norm VJP and scores the layer in one product: delta is read once per layer
        (the product is memory-bound), not once per port. q/k/v parts arrive as gw = (gradient at the
        projection) @ W^T, times the norm's weight where the VJP is in closed form. Rows the layer's q/k/v
        cannot receive from (its own heads) are zeroed by the edge mask at the end."""
        parts = self.pending.setdefault(layer, {})
        parts[part] = grads
        if len(parts) < 4:
            return
        del self.pending[layer]
        qkv = torch.cat([parts["q"], parts["k"], parts["v"]])  # [R, N, D]
        x = self.live_rows(self.resid.pop(layer))  # [N, D] the norm's input
        norm = self.arch.ln_attn(self.model, layer)
        params = norm_parameters(norm)
        if params is not None:
            pre_norm = norm_vjp(x, qkv, params[1], params[2])
        else:  # any other norm: its VJP through autograd, still once per layer
            resid = x.unsqueeze(0).expand(qkv.shape[0], -1, -1).clone().requires_grad_(True)
            with torch.enable_grad():
                out = norm(resid)
                (pre_norm,) = torch.autograd.grad(out, resid, qkv.to(out.dtype))
            pre_norm = pre_norm.float()
        self.accumulate_block(self.graph.q_index(layer, 0), self.graph.mlp_index(layer),
                              torch.cat([pre_norm, parts["mlp"]]))

    def accumulate_block(self, first_receiver: int, n_senders: int, grads: torch.Tensor) -> None:
        """scores[rows within the first n_senders, receivers] += weight * delta . grads; grads [R, N, D] float
        at the live positions, for receivers first_receiver .. first_receiver + R - 1."""
        lo, hi = self.rows[0], min(self.rows[1], n_senders)
        if lo >= hi or self.delta is None:
            return
        held = self.grad_sum.pop(first_receiver, None)
        if held is not None:
            grads = held.add_(grads)
        if self.buffer:
            self.grad_sum[first_receiver] = grads
            return
        senders = self.delta[lo:hi].flatten(1)
        receivers = slice(first_receiver, first_receiver + grads.shape[0])
        self.scores[lo:hi, receivers] += self.weight * (senders @ grads.flatten(1).T)

    def _port_grad(self, layer: int, port: str, w: torch.Tensor) -> Callable:
        """w [heads, D, d_head] float32: the port's projection (times the norm weight in the closed form)."""
        def on_grad(grad: torch.Tensor) -> None:
            if self.live is not None:
                rows = self.live_rows(grad).float().reshape(-1, w.shape[0], w.shape[2])  # [N, heads, d_head]
                self.collect(layer, port, torch.einsum("nhe,hde->hnd", rows, w))

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()  # a fresh tensor: only this projection's use reaches the hook
            act.register_hook(on_grad)
            return act

        return fn

    def _whole_grad(self, receiver: int, layer: int | None) -> Callable:
        """An MLP input (layer given: collected with its layer) or the logits (scored at once)."""
        def on_grad(grad: torch.Tensor) -> None:
            if self.live is None:
                return
            grads = self.live_rows(grad).float().unsqueeze(0)
            if layer is None:
                self.accumulate_block(receiver, self.graph.n_upstream, grads)
            else:
                self.collect(layer, "mlp", grads)

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()  # not the residual skip's use, only the norm's
            act.register_hook(on_grad)
            return act

        return fn

    def _keep_resid(self, layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            self.resid[layer] = act.detach()
            return act

        return fn

    def _qkv_weights(self, layer: int) -> dict[str, torch.Tensor]:
        weights = [w.detach().float() for w in self.arch.qkv_weights(self.model, layer)]
        params = norm_parameters(self.arch.ln_attn(self.model, layer))
        if params is not None and params[0] is not None:  # fold the norm's weight in: gw = g * weight
            scale = params[0].detach().float()[:, None]
            weights = [w * scale for w in weights]
        return dict(zip("qkv", weights))

    def hooks(self) -> list[tuple[str, Callable]]:
        """The hooks for one forward+backward pass; layers none of whose receivers read the scored rows
        get none."""
        self.pending, self.resid = {}, {}
        hooks: list[tuple[str, Callable]] = [("hook_embed", lambda act, hook: act.detach().requires_grad_(True))]
        for layer in range(self.arch.n_layers):
            if self.rows[0] >= self.graph.mlp_index(layer):
                continue
            weights = self._qkv_weights(layer)
            hooks.append((f"blocks.{layer}.ln1.hook_in", self._keep_resid(layer)))
            hooks += [(f"blocks.{layer}.attn.hook_{port}", self._port_grad(layer, port, weights[port]))
                      for port in "qkv"]
            hooks.append((f"blocks.{layer}.ln2.hook_in", self._whole_grad(self.graph.mlp_in_index(layer), layer)))
        hooks.append(("ln_final.hook_in", self._whole_grad(self.graph.logits_index, None)))
        return hooks


def add_hook(shift: torch.Tensor) -> Callable:
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + shift.to(act.dtype)

    return fn


class AnswerUnembed:
    """Backpropagates the metric through the unembedding at the answer positions only.

    Every metric reads the logits at each row's answer position alone, so the gradient of the full
    [B, P, vocab] logits is zero elsewhere; autograd would still multiply all of it by the unembedding.
    The hook detaches the unembedding's input (the forward computes the logits as before, without a graph);
    `logits` then recomputes the answer positions' logits from that input with a graph and writes them over
    the detached logits, so the backward through the unembedding is [B, vocab] x [vocab, D]."""

    HOOK = "unembed.hook_in"

    def __init__(self, bridge: Any):
        self.bridge, self.x = bridge, None
        self.active = self.HOOK in getattr(bridge, "hook_dict", {}) and hasattr(bridge, "unembed")

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(self.HOOK, self._hook)] if self.active else []

    def _hook(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        self.x = act
        return act.detach()

    def logits(self, logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        if self.x is None:
            return logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        answer = self.bridge.unembed(self.x[rows, batch.answer_pos].unsqueeze(1))[:, 0]
        self.x = None
        return logits.detach().index_put((rows, batch.answer_pos), answer.to(logits.dtype))


def _clean_pass(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                metric: Metric, acc: EdgeScoreAccumulator, ablated: torch.Tensor,
                summarize: Callable[[torch.Tensor], Any] = lambda delta: None) -> Any:
    """The clean forward+backward: records the clean sender outputs, sets delta, accumulates its gradient.
    Returns summarize(delta [n_upstream, B, P, D]), taken before the full delta is freed."""
    unembed = AnswerUnembed(bridge)
    with torch.enable_grad():
        logits, clean = run_capture(bridge, graph, arch, model, batch.clean_ids, batch.attention_mask,
                                    extra_hooks=acc.hooks() + unembed.hooks())
        delta = ablated - clean
        del clean
        acc.set_delta(delta)
        summary = summarize(delta)
        del delta
        metric.prepare(batch, clean_logits=logits.detach())
        metric(unembed.logits(logits, batch), batch).sum().backward()
    return summary


def _gradient_pass(bridge: Any, batch: PairBatch, metric: Metric, hooks: list[tuple[str, Callable]]) -> None:
    unembed = AnswerUnembed(bridge)
    with torch.enable_grad():
        logits = bridge.run_with_hooks(batch.clean_ids, fwd_hooks=hooks + unembed.hooks(),
                                       attention_mask=batch.attention_mask)
        metric(unembed.logits(logits, batch), batch).sum().backward()


def _setup(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
           metric: str | Metric, ablation: str, reference: PairBatch | None
           ) -> tuple[torch.Tensor, Metric, EdgeScoreAccumulator, torch.Tensor]:
    ablated, corrupt_logits = ablated_outputs(bridge, graph, arch, model, batch, ablation, reference)
    prepared = prepared_metric(bridge, batch, metric, corrupt_logits=corrupt_logits)
    scores = torch.zeros(graph.n_upstream, graph.n_receivers, device=batch.clean_ids.device)
    return ablated, prepared, EdgeScoreAccumulator(arch, graph, model, scores, batch.attention_mask), scores


def eap_ig_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                  steps: int = DEFAULT_IG_STEPS, metric: str | Metric = "logprob", ablation: str = "corrupted",
                  reference: PairBatch | None = None) -> torch.Tensor:
    """EAP-IG over the input embeddings (m = steps); steps=1 is plain EAP. [n_upstream, n_receivers]."""
    with kv_layout(model, arch, graph):
        return _eap_ig_scores(bridge, model, arch, graph, batch, steps, metric, ablation, reference)


def _eap_ig_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                   steps: int, metric: str | Metric, ablation: str, reference: PairBatch | None) -> torch.Tensor:
    if steps < 1:
        raise ValueError("steps must be at least 1")
    ablated, prepared, acc, scores = _setup(bridge, model, arch, graph, batch, metric, ablation, reference)
    acc.weight = 1.0 / steps
    acc.buffer = steps > 1  # every step's receiver gradients are summed; the last step scores the sum
    input_delta = _clean_pass(bridge, model, arch, graph, batch, prepared, acc, ablated,
                              lambda delta: delta[0].float().clone())  # k = m
    del ablated
    for k in range(1, steps):
        acc.buffer = k < steps - 1
        _gradient_pass(bridge, batch, prepared, acc.hooks() + [("hook_embed", add_hook((1 - k / steps) * input_delta))])
    return scores * graph.edge_mask.to(scores.device)


def eap_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
               metric: str | Metric = "logprob", ablation: str = "corrupted",
               reference: PairBatch | None = None) -> torch.Tensor:
    """EAP edge scores [n_upstream, n_receivers] (zero where no edge exists)."""
    return eap_ig_scores(bridge, model, arch, graph, batch, 1, metric, ablation, reference)


def sender_blocks(graph: Graph) -> list[tuple[str, tuple[int, int]]]:
    """(output hook, sender rows) for the input and each layer's heads and MLP."""
    blocks = [("hook_embed", (0, 1))]
    for layer in range(graph.n_layers):
        blocks.append((f"blocks.{layer}.hook_attn_out", (graph.head_index(layer, 0), graph.mlp_index(layer))))
        blocks.append((f"blocks.{layer}.hook_mlp_out", (graph.mlp_index(layer), graph.mlp_index(layer) + 1)))
    return blocks


def eap_ig_activation_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
                             steps: int = DEFAULT_IG_STEPS, metric: str | Metric = "logprob",
                             ablation: str = "corrupted", reference: PairBatch | None = None) -> torch.Tensor:
    """EAP-IG over each layer block's activations. [n_upstream, n_receivers]."""
    with kv_layout(model, arch, graph):
        return _eap_ig_activation_scores(bridge, model, arch, graph, batch, steps, metric, ablation, reference)


def _eap_ig_activation_scores(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph,
                              batch: PairBatch, steps: int, metric: str | Metric, ablation: str,
                              reference: PairBatch | None) -> torch.Tensor:
    if steps < 1:
        raise ValueError("steps must be at least 1")
    ablated, prepared, acc, scores = _setup(bridge, model, arch, graph, batch, metric, ablation, reference)
    acc.weight = 1.0 / steps
    def block_totals(delta: torch.Tensor) -> list[tuple[str, tuple[int, int], torch.Tensor]]:
        return [(hook, rows, delta[rows[0]: rows[1]].sum(0).float()) for hook, rows in sender_blocks(graph)]

    blocks = _clean_pass(bridge, model, arch, graph, batch, prepared, acc, ablated, block_totals)  # k = m, all blocks
    del ablated
    for hook_name, rows, block_delta in blocks:  # block_delta: the block's total (ablated - clean) output
        acc.rows = rows
        for k in range(1, steps):
            acc.buffer = k < steps - 1  # the block's steps are summed and scored once, in its last step
            _gradient_pass(bridge, batch, prepared, acc.hooks() + [(hook_name, add_hook((1 - k / steps) * block_delta))])
    return scores * graph.edge_mask.to(scores.device)


def node_scores(edge_scores: torch.Tensor) -> torch.Tensor:
    """[n_upstream]: a sender's score as a unit, delta_u . d metric / d out_u = the sum of its outgoing edges."""
    return edge_scores.sum(1)


def check_method(method: str, ablation: str) -> None:
    """EAP-IG over the inputs interpolates between the clean and the corrupted prompt, so it needs corrupted
    patching; with zero or mean ablation it is rejected, as EAP-IG's own `attribute` rejects it."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    if method == "eap-ig" and ablation != "corrupted":
        raise ValueError(f"method 'eap-ig' (EAP-IG over the inputs) needs --ablation corrupted, not '{ablation}'; "
                         "use eap or eap-ig-activations with zero or mean ablation")


def attribute(bridge: Any, model: torch.nn.Module, arch: ArchSpec, graph: Graph, batch: PairBatch,
              method: str = "eap", metric: str | Metric = "logprob", ablation: str = "corrupted",
              reference: PairBatch | None = None, steps: int = DEFAULT_IG_STEPS, level: str = "edge") -> torch.Tensor:
    """Edge scores [n_upstream, n_receivers] (level='edge') or node scores [n_upstream] (level='node')."""
    if level not in ("edge", "node"):
        raise ValueError(f"level must be 'edge' or 'node', not '{level}'")
    check_method(method, ablation)
    common = dict(metric=metric, ablation=ablation, reference=reference)
    if method == "exact":
        from circuits.exact import exact_edge_scores, exact_node_scores

        fn = exact_node_scores if level == "node" else exact_edge_scores
        return fn(bridge, model, arch, graph, batch, **common)
    if method == "eap":
        scores = eap_scores(bridge, model, arch, graph, batch, **common)
    elif method == "eap-ig":
        scores = eap_ig_scores(bridge, model, arch, graph, batch, steps, **common)
    elif method == "eap-ig-activations":
        scores = eap_ig_activation_scores(bridge, model, arch, graph, batch, steps, **common)
    else:
        raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    return node_scores(scores) if level == "node" else scores
