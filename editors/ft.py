"""FT-L: constrained fine-tuning of MLP output projections, the baseline of the ROME paper.

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", §3.2 baselines) after
Zhu et al. 2020 ("Modifying Memories in Transformer Models"): fine-tune the MLP output
projection weights of `layers` with Adam (`lr`, `num_steps`) on the negative log-likelihood
of all of target_new's tokens after the rewrite prompt, and after every step project each
weight back into the L∞ ball of radius `norm_constraint` around its original value.
All cases of one `apply` are fitted jointly in one batch; stops early when the mean
per-token NLL falls below `early_stop_nll`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bench.tokens import TargetBatch, build_batch
from editors.base import EditOutcome, Editor, EditorError, register

if TYPE_CHECKING:
    from bench.data import EditCase
    from bench.models import ModelBundle


def target_nll(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Mean over rows of the per-token NLL of the target tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    picked = logits.gather(1, batch.logit_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    lp = picked.log_softmax(-1).gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1) * batch.target_mask
    return (-lp.sum(-1) / batch.target_mask.sum(-1)).mean()


@register("ft")
class FineTuneL(Editor):
    """FT-L: fine-tune one MLP output projection on the target tokens, L-infinity bound on the change."""

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.layers = [int(layer) for layer in hparams.get("layers", [])]
        if not self.layers:
            raise EditorError("ft: hparams need a non-empty `layers` list")

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(layer) for layer in self.layers]

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        hp, bundle = self.hparams, self.bundle
        batch = build_batch(bundle.tokenizer, [c.rewrite_prompt for c in cases], [c.target_new for c in cases],
                            bundle.device)
        weights = [bundle.arch.mlp_out_weight(bundle.model, layer) for layer in self.layers]
        originals = [w.detach().clone() for w in weights]
        eps = float(hp.get("norm_constraint", 5e-4))
        steps, threshold = int(hp.get("num_steps", 25)), float(hp.get("early_stop_nll", 1e-2))
        opt = torch.optim.Adam(weights, lr=float(hp.get("lr", 5e-4)), weight_decay=float(hp.get("weight_decay", 0.0)))
        for w in weights:
            w.requires_grad_(True)
        try:
            for step in range(steps + 1):
                loss = target_nll(bundle.model, batch)
                if step == 0:
                    first = loss.detach()
                if step == steps or loss.item() < threshold:  # one host sync per step, for the early stop
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for w, w0 in zip(weights, originals):
                        w.copy_(torch.clamp(w, w0 - eps, w0 + eps))  # L∞ projection
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        change = torch.stack([(w.detach() - w0).abs().max() for w, w0 in zip(weights, originals)]).max()
        values = torch.stack([first, loss.detach(), change.float()]).tolist()  # the one host sync
        stats = {"loss_initial": values[0], "loss_final": values[1], "steps": step, "max_abs_change": values[2],
                 "n_cases": len(cases)}
        return EditOutcome(layers=list(self.layers), stats=stats)
