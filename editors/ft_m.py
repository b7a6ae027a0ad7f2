"""FT-M: fine-tuning with the cross-entropy loss masked to the target tokens (EasyEdit's FT-M).

Reference: EasyEdit (zjunlp/EasyEdit, easyeditor/models/ft/ft_main.py) with
`objective_optimization: "target_new"`, the variant the EasyEdit survey (Zhang et al. 2024,
"A Comprehensive Study of Knowledge Editing for LLMs") calls FT-M. For prompt p and target tokens
o_1..o_J the loss of one request is the teacher-forced token cross-entropy over the target only:

    L = -(1/J) Σ_j log P(o_j | p, o_<j)        (prompt positions carry no loss)

averaged over the requests of a batch. Adam (`lr`, `weight_decay`) updates only the MLP output
projection of each layer in `layers` (GPT-2 `mlp.c_proj` weight and bias, as EasyEdit's
`rewrite_module_tmp` "transformer.h.{}.mlp.c_proj" matches both; Llama `mlp.down_proj.weight`).
Per epoch (`num_steps` epochs) the requests are walked in chunks of `batch_size`; a chunk whose
loss is below `early_stop_loss` (EasyEdit: 1e-2, hard-coded) takes no step, and the epoch loop stops
once the epoch's mean loss is below it. If `norm_constraint` is a number, each weight is projected
into the L∞ ball of that radius around its original value after every chunk; `false` (EasyEdit's
FT-M configs) leaves it free.

Differences from EasyEdit, deliberate:
- Prompts are tokenised once with the target appended token-wise (prompt ids + " target" ids),
  right padded, so the label mask is exact for every row. EasyEdit tokenises the concatenated
  string and derives the mask from pad counts, which is exact only for left padding or batch 1.
- The loss is read only at the target-predicting positions (same value as masking the full
  sequence's cross-entropy).
- This repo's `ft` (FT-L) already uses the same teacher-forced target-only loss (EasyEdit's FT-L,
  "prompt_last", instead predicts every target token from the last prompt position). So `ft` and
  `ft-m` differ here in: no L∞ constraint by default, the GPT-2 bias is trained too, EasyEdit's
  chunked epoch loop and its skip-step/early-stop rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bench.arch import parameter
from bench.tokens import build_batch
from editors.base import EditOutcome, Editor, EditorError, register
from editors.ft import target_nll

if TYPE_CHECKING:
    from bench.data import EditCase
    from bench.models import ModelBundle


def rewrite_parameter_names(family: str, layers: list[int]) -> list[str]:
    """The parameters EasyEdit's FT rewrites: GPT-2 c_proj weight and bias, Llama down_proj weight."""
    if family == "gpt2":
        return [f"transformer.h.{layer}.mlp.c_proj.{kind}" for layer in layers for kind in ("weight", "bias")]
    return [f"model.layers.{layer}.mlp.down_proj.weight" for layer in layers]


def norm_radius(value: Any) -> float | None:
    """`norm_constraint`: a positive number, or false/null for no constraint."""
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise EditorError(f"ft-m: norm_constraint must be a positive number or false; got {value!r}")
    return float(value)


@register("ft-m")
class FineTuneM(Editor):
    """FT-M (EasyEdit): fine-tune one MLP output projection, loss on the target tokens only."""

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.layers = [int(layer) for layer in hparams.get("layers", [])]
        if not self.layers:
            raise EditorError("ft-m: hparams need a non-empty `layers` list")
        objective = hparams.get("objective_optimization", "target_new")
        if objective != "target_new":
            raise EditorError(f"ft-m: objective_optimization must be 'target_new' (FT-M); got {objective!r}")
        self.radius = norm_radius(hparams.get("norm_constraint", False))
        self.batch_size = int(hparams.get("batch_size", 1))
        if self.batch_size < 1:
            raise EditorError("ft-m: batch_size must be at least 1")

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return rewrite_parameter_names(self.bundle.arch.family, self.layers)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        hp, bundle = self.hparams, self.bundle
        weights = [parameter(bundle.model, name) for name in self.parameters_to_touch(cases)]
        originals = [w.detach().clone() for w in weights]
        chunks = [cases[i: i + self.batch_size] for i in range(0, len(cases), self.batch_size)]
        batches = [build_batch(bundle.tokenizer, [c.rewrite_prompt for c in chunk], [c.target_new for c in chunk],
                               bundle.device) for chunk in chunks]
        threshold = float(hp.get("early_stop_loss", 1e-2))
        opt = torch.optim.Adam(weights, lr=float(hp.get("lr", 5e-4)), weight_decay=float(hp.get("weight_decay", 0.0)))
        for w in weights:
            w.requires_grad_(True)
        epoch_losses: list[float] = []
        try:
            for _epoch in range(int(hp.get("num_steps", 25))):
                losses = [self._chunk_step(opt, batch, threshold, weights, originals) for batch in batches]
                epoch_losses.append(sum(l * len(c) for l, c in zip(losses, chunks)) / len(cases))
                if epoch_losses[-1] < threshold:
                    break
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        with torch.no_grad():
            final = sum(float(target_nll(bundle.model, b)) * len(c) for b, c in zip(batches, chunks)) / len(cases)
            change = max(float((w - w0).abs().max()) for w, w0 in zip(weights, originals))
        stats = {"loss_initial": epoch_losses[0] if epoch_losses else final, "loss_final": final,
                 "epochs": len(epoch_losses), "max_abs_change": change, "n_cases": len(cases)}
        return EditOutcome(layers=list(self.layers), stats=stats)

    def _chunk_step(self, opt: torch.optim.Optimizer, batch: Any, threshold: float, weights: list[torch.Tensor],
                    originals: list[torch.Tensor]) -> float:
        """One EasyEdit inner step: loss, a step unless it is already below the threshold, then the L∞ clamp."""
        opt.zero_grad()
        loss = target_nll(self.bundle.model, batch)
        value = loss.item()
        if value >= threshold:
            loss.backward()
            opt.step()
        if self.radius is not None:
            with torch.no_grad():
                for w, w0 in zip(weights, originals):
                    w.copy_(torch.clamp(w, w0 - self.radius, w0 + self.radius))
        return value
