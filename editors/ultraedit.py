"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu et al. 2025, "UltraEdit: Training-, Subject-,
and Memory-Free Lifelong Editing in Large Language Models"), batched.

For a batch of edits and each edited module (the MLP output projection of every layer in `layers`, as the
authors' Mistral-7B, GPT-J and Phi-4 configurations edit `down_proj` / `fc_out`), following XiaojieGu/UltraEdit
`editor/ultraedit.py` and `nets.py`:

1. Features (`cache`): the cases, longest first (the authors' collate order), in chunks of `grad_batch_size`;
   per chunk one forward pass on prompt + target_new and the cross-entropy of target_new's tokens, averaged
   over all of the chunk's answer tokens, then one backward pass. At every answer-predicting position
   (`token: ans`: the last prompt token and all but the last target token; `all`: every token) a row
   k = the module's input (d_mlp) and g = ∂loss/∂(module output) (d_model). All chunks use the model as it
   was before the batch.
2. Lifelong normalisation (`RunningMeanStd`): running mean μ and variance σ² of the rows [k, g] of every
   batch seen so far (this one included), merged exactly per chunk and module (Chan et al.); one set of
   statistics per module shape, so all edited layers share it as in the authors' code. Rows are
   standardised: [k̂, ĝ] = ([k, g] − μ) / (σ + ε), σ² the unbiased variance, ε float32's machine epsilon.
3. Target values: v = −lr · ‖k̂‖² · ĝ per row (a normalised gradient step).
4. Closed form (`predict_param_shifts`): with K [N, d_mlp] the raw keys and V [N, d_model],
       ΔW = argmin ‖K ΔW − V‖² + ridge · ‖ΔW‖² = (KᵀK + ridge · I)⁻¹ KᵀV,
   added to every layer at once (as x ↦ x (W + ΔW) in the authors' orientation).

Sequential mode keeps the statistics from batch to batch (editors/_lifelong.py: a batch the run rolls back
leaves them as they were); `undo()` clears them, so in the harness's default mode every case starts afresh.
With one edited layer and a single feature row (one case, one-token answer, first batch) σ = 0, so
k̂ = ĝ = 0 and the edit is empty: the method is meant for batches.

Differences from the authors' code: by default the variance update is the exact merge; their `var +=
B·var_batch + …` adds each chunk's scatter times B/(B−1) (`variance: reference` reproduces it, NaN for a
one-row chunk as torch's var); their `predict_param_shifts` reads ⌊n/chunk⌋ chunks of gradients but ⌈n/chunk⌉
of keys, so when the batch is not a multiple of the chunk size the last chunk's gradient rows are zeros there,
and all rows here; the solve is in float64; the gradient rows come from zero-valued
probes added to the module outputs rather than from backward hooks on weights that require gradients (the same
values); the authors' gate/up-projection configurations (Llama-3, Qwen2.5) are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from editors._lifelong import Staged, weights_digest
from editors.base import EditOutcome, Editor, EditorError
from editors.settings import Hparams, setting
from lmview.tokens import TargetBatch, build_batch, prompt_ids, target_ids

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

EPS = torch.finfo(torch.float32).eps  # the authors' normaliser runs in float32


@dataclass(frozen=True)
class UltraEditHparams(Hparams):
    editor = "ultraedit"
    layers: list[int] = setting([], layer=True, required=True, doc="the layers whose MLP output projection is edited")
    lr: float = setting(1e-6, minimum=0.0, doc="the step size in v = −lr·‖k̂‖²·ĝ (the authors' editor.lr)")
    token: str = setting("ans", choices=("ans", "all"), doc="feature rows: the answer-predicting positions, or all")
    grad_batch_size: int = setting(10, minimum=1, unit="cases", doc="cases per forward/backward; the loss is the mean "
                                                                   "over their answer tokens (the authors' dataset.batch_size)")
    ridge: float = setting(1.0, minimum=0.0, doc="the weight of I in (KᵀK + ridge·I); 1 in the authors' code")
    variance: str = setting("exact", choices=("exact", "reference"),
                            doc="the running variance: exact, or as the authors' RunningMeanStd.update adds a chunk")


@dataclass(frozen=True)
class RunningStats:
    """Count, mean and summed squared deviations (float64) of every feature row seen so far."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, size: int, device: torch.device) -> RunningStats:
        zeros = torch.zeros(size, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone())

    def merged(self, rows: torch.Tensor, reference: bool = False) -> RunningStats:
        """The statistics with `rows` [B, D] added: Chan et al.'s exact pairwise merge, or (`reference`) the
        authors' update, which adds B times the chunk's unbiased variance instead of its scatter."""
        rows = rows.double()
        b = rows.shape[0]
        if b == 0:
            return self
        n = self.n + b
        batch_mean = rows.mean(0)
        delta = batch_mean - self.mean
        scatter = (rows - batch_mean).pow(2).sum(0)
        if reference:
            scatter = scatter * b / (b - 1) if b > 1 else torch.full_like(scatter, float("nan"))
        m2 = self.m2 + scatter + delta.pow(2) * (self.n * b / n)
        return RunningStats(n, self.mean + delta * (b / n), m2)

    @property
    def std(self) -> torch.Tensor:
        """√(unbiased variance); 0 with fewer than two rows."""
        return (self.m2 / (self.n - 1 + EPS)).sqrt()

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.double() - self.mean) / (self.std + EPS)


def ultraedit_update(keys: torch.Tensor, grads: torch.Tensor, stats: RunningStats, lr: float,
                     ridge: float) -> torch.Tensor:
    """ΔW [d_in, d_out] (x ↦ x ΔW) = (KᵀK + ridge·I)⁻¹ KᵀV, V = −lr ‖k̂‖² ĝ; `keys` [N, d_in], `grads` [N, d_out]."""
    k = keys.double()
    z = stats.normalise(torch.cat([k, grads.double()], -1))
    k_hat, g_hat = z.split([k.shape[1], grads.shape[1]], -1)
    values = -lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat
    gram = k.T @ k + ridge * torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    return torch.linalg.solve(gram, k.T @ values)


@dataclass
class Features:
    """One batch's rows per layer: keys [N, d_mlp] and output gradients [N, d_model] (float64), and the loss."""

    keys: dict[int, torch.Tensor]
    grads: dict[int, torch.Tensor]
    chunks: list[dict[int, torch.Tensor]]  # per chunk and layer: [k, g] rows, in the order merged
    loss: float


class UltraEdit(Editor, hparams=UltraEditHparams):
    """UltraEdit (Gu et al. 2025): normalised gradient features, lifelong statistics, one ridge solve per batch."""

    batched = True
    hp: UltraEditHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        if self.hp.ridge <= 0:
            raise EditorError("ultraedit: ridge must be positive")
        if len(set(self.hp.layers)) != len(self.hp.layers) or not self.hp.layers:
            raise EditorError(f"ultraedit: layers must be distinct; got {self.hp.layers}")
        self.layers = sorted(self.hp.layers)
        size = bundle.arch.d_mlp + bundle.arch.d_model
        self._stats: Staged[RunningStats] = Staged(RunningStats.empty(size, bundle.device))
        self.last_features: Features | None = None
        self.last_deltas: dict[int, torch.Tensor] = {}  # ΔW per layer as [d_model, d_mlp] (value = W @ key)

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(layer) for layer in self.layers]

    def statistics(self) -> RunningStats:
        """The normalisation statistics of the batches still in the model."""
        return self._stats.settle(self._digest())

    # -- features --
    def ordered_chunks(self, cases: list[EditCase]) -> list[list[EditCase]]:
        """Longest prompt + answer first (stable), in chunks of grad_batch_size."""
        tok = self.bundle.tokenizer

        def length(case: EditCase) -> int:
            return len(prompt_ids(tok, case.rewrite_prompt)) + len(target_ids(tok, case.target_new)) - 1

        ordered = sorted(cases, key=length, reverse=True)
        size = self.hp.grad_batch_size
        return [ordered[i: i + size] for i in range(0, len(ordered), size)]

    def row_mask(self, batch: TargetBatch) -> torch.Tensor:
        """[B, T] bool: the positions whose key and gradient become rows."""
        if self.hp.token == "all":
            return batch.attention_mask.bool()
        mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        rows = torch.arange(batch.logit_pos.shape[0], device=mask.device).unsqueeze(-1).expand_as(batch.logit_pos)
        mask[rows[batch.target_mask], batch.logit_pos[batch.target_mask]] = True
        return mask

    def chunk_features(self, chunk: list[EditCase]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], float]:
        """Keys and output gradients at the row positions of one chunk, per layer, and the chunk's loss."""
        arch, model = self.bundle.arch, self.bundle.model
        batch = build_batch(self.bundle.tokenizer, [c.rewrite_prompt for c in chunk], [c.target_new for c in chunk],
                            self.bundle.device)
        mask = self.row_mask(batch)
        keys: dict[int, torch.Tensor] = {}
        probes: dict[int, torch.Tensor] = {}

        def hook_for(layer: int):
            def hook(_m, args, out):
                keys[layer] = args[0][mask].detach().double()
                probes[layer] = torch.zeros_like(out, requires_grad=True)
                return out + probes[layer]
            return hook

        handles = [arch.mlp_out_proj(model, layer).register_forward_hook(hook_for(layer)) for layer in self.layers]
        try:
            with torch.enable_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                picked = logits[torch.arange(len(chunk), device=logits.device).unsqueeze(-1).expand_as(batch.logit_pos)
                                [batch.target_mask], batch.logit_pos[batch.target_mask]]
                loss = torch.nn.functional.cross_entropy(picked.float(), batch.target_ids[batch.target_mask])
                grads = torch.autograd.grad(loss, [probes[layer] for layer in self.layers])
        finally:
            for h in handles:
                h.remove()
        return keys, {layer: g[mask].double() for layer, g in zip(self.layers, grads)}, float(loss.detach())

    def features(self, cases: list[EditCase]) -> Features:
        keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        chunks, losses = [], []
        for chunk in self.ordered_chunks(cases):
            k, g, loss = self.chunk_features(chunk)
            chunks.append({layer: torch.cat([k[layer], g[layer]], -1) for layer in self.layers})
            losses.append(loss)
            for layer in self.layers:
                keys[layer].append(k[layer])
                grads[layer].append(g[layer])
        return Features({layer: torch.cat(keys[layer]) for layer in self.layers},
                        {layer: torch.cat(grads[layer]) for layer in self.layers}, chunks, sum(losses) / len(losses))

    # -- the edit --
    def apply(self, cases: list[EditCase]) -> EditOutcome:
        if not cases:
            return EditOutcome(layers=list(self.layers), stats={"n_cases": 0})
        stats = self.statistics()
        features = self.features(cases)
        for chunk in features.chunks:  # the authors' order: per chunk, per module
            for layer in self.layers:
                stats = stats.merged(chunk[layer], reference=self.hp.variance == "reference")
        arch, model = self.bundle.arch, self.bundle.model
        self.last_deltas = {}
        for layer in self.layers:
            delta = ultraedit_update(features.keys[layer], features.grads[layer], stats, self.hp.lr, self.hp.ridge).T
            self.last_deltas[layer] = delta
        for layer, delta in self.last_deltas.items():
            w = arch.mlp_out_matrix(model, layer)
            with torch.no_grad():
                w.add_(delta.to(w.dtype))
        self._stats.stage(stats, self._digest())
        self.last_features = features
        norms = torch.stack([d.norm() for d in self.last_deltas.values()]).sum()
        return EditOutcome(layers=list(self.layers), stats={
            "n_cases": len(cases), "feature_rows": int(features.keys[self.layers[0]].shape[0]),
            "normaliser_rows": stats.n, "loss_before": features.loss, "update_norm": float(norms)})

    def _digest(self) -> list[torch.Tensor]:
        arch, model = self.bundle.arch, self.bundle.model
        return weights_digest([arch.mlp_out_matrix(model, layer) for layer in self.layers])

    def undo(self) -> None:
        self._stats.reset()
        self.last_features, self.last_deltas = None, {}
