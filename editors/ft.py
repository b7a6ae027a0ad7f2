"""FT-L: constrained fine-tuning, the baseline of the ROME paper (Meng et al. 2022, §3.2, after Zhu et al. 2020).

As kmeng01/rome `baselines/ft/ft_main.py` runs it (`hparams/FT/*_constr.json`):

- Parameters: every parameter of the MLP output projection of each layer in `layers`. ROME matches them by
  the substring `transformer.h.{l}.mlp.c_proj`, so on GPT-2 the weight *and* the bias are trained; Llama's
  `down_proj` has no bias. ROME's configs use layer 0.
- Loss ("prompt last"): the logits at the last prompt token predict *every* token of target_new (with its
  leading space); for a request with target tokens o_1..o_J,
        L = -(1/J) Σ_j log P(o_j | prompt)         (no teacher forcing; one position),
  averaged over the requests of a chunk.
- Loop: `num_steps` epochs of Adam (`lr`, `weight_decay`) over chunks of `batch_size` requests (ROME's
  default 128). A chunk whose loss is below 1e-2 takes no step; after every chunk each parameter is projected
  into the L∞ ball of radius `norm_constraint` around its original value (false: no projection); the epochs
  stop once the epoch's mean chunk loss (weighted by chunk size) is below 1e-2.

EasyEdit's FT with `objective_optimization: prompt_last` (its FT-L) runs the same loss and loop; it differs
only in its configurations (for Llama-family models: a middle layer and no norm constraint). That variant is
a hyperparameter file, `editors/hparams/ft-l/variants/easyedit-<model>.yaml` (pass it with `--hparams`).

The fine-tuning loop is shared with `ft-m` (editors/ft_m.py), which swaps in the teacher-forced loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from editors.base import EditOutcome, Editor, EditorError
from editors.settings import Hparams, setting
from lmview.arch import parameter
from lmview.tokens import TargetBatch, build_batch

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

EARLY_STOP_LOSS = 1e-2  # hard-coded in both ROME's and EasyEdit's ft_main.py


def target_nll(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Teacher-forced: mean over rows of the per-token NLL of the target tokens (FT-M's loss)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    picked = logits.gather(1, batch.logit_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    lp = picked.log_softmax(-1).gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1) * batch.target_mask
    return (-lp.sum(-1) / batch.target_mask.sum(-1)).mean()


def prompt_last_nll(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """ROME's FT-L loss: every target token scored at the last prompt position, mean per row, mean over rows."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.last_prompt_pos].float().log_softmax(-1)  # [B, V]
    lp = last.gather(1, batch.target_ids) * batch.target_mask
    return (-lp.sum(-1) / batch.target_mask.sum(-1)).mean()


def rewrite_parameter_names(family: str, layers: list[int], bias: bool = True) -> list[str]:
    """The MLP output projection's parameters: GPT-2 c_proj weight (and bias), Llama down_proj weight."""
    if family == "gpt2":
        kinds = ("weight", "bias") if bias else ("weight",)
        return [f"transformer.h.{layer}.mlp.c_proj.{kind}" for layer in layers for kind in kinds]
    return [f"model.layers.{layer}.mlp.down_proj.weight" for layer in layers]


def norm_radius(editor: str, value: Any) -> float | None:
    """`norm_constraint`: a positive number, or false/null for no constraint."""
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise EditorError(f"{editor}: norm_constraint must be a positive number or false; got {value!r}")
    return float(value)


Loss = Callable[[torch.nn.Module, TargetBatch], torch.Tensor]


def finetune(model: torch.nn.Module, weights: list[torch.Tensor], batches: list[TargetBatch], sizes: list[int],
             loss_fn: Loss, steps: int, lr: float, weight_decay: float, radius: float | None,
             threshold: float) -> list[float]:
    """ROME's/EasyEdit's FT loop; returns the epochs' mean chunk losses (before each chunk's step)."""
    originals = [w.detach().clone() for w in weights]
    opt = torch.optim.Adam(weights, lr=lr, weight_decay=weight_decay)
    for w in weights:
        w.requires_grad_(True)
    epoch_losses: list[float] = []
    try:
        for _epoch in range(steps):
            losses = []
            for batch in batches:
                opt.zero_grad()
                loss = loss_fn(model, batch)
                losses.append(loss.item())
                if losses[-1] >= threshold:
                    loss.backward()
                    opt.step()
                if radius is not None:
                    with torch.no_grad():
                        for w, w0 in zip(weights, originals):
                            w.copy_(torch.clamp(w, w0 - radius, w0 + radius))  # L∞ projection
            epoch_losses.append(sum(l * n for l, n in zip(losses, sizes)) / sum(sizes))
            if epoch_losses[-1] < threshold:
                break
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
    return epoch_losses


@dataclass(frozen=True)
class FineTuneHparams(Hparams):
    layers: list[int] = setting([], layer=True, required=True, doc="the layers whose MLP output projection is tuned")
    num_steps: int = setting(25, minimum=1, unit="epochs over the cases")
    lr: float = setting(5e-4, minimum=0.0, unit="Adam learning rate")
    weight_decay: float = setting(0.0, minimum=0.0, unit="Adam weight decay")
    norm_constraint: float | bool | None = setting(False, doc="L∞ radius around the original weights; false: none")
    batch_size: int = setting(128, minimum=1, unit="cases per optimiser step")
    train_bias: bool = setting(True, doc="also fine-tune the projection's bias (GPT-2)")
    early_stop_loss: float = setting(EARLY_STOP_LOSS, unit="nats", doc="stop once an epoch's mean loss is below")


@dataclass(frozen=True)
class FineTuneLHparams(FineTuneHparams):
    editor = "ft-l"
    objective_optimization: str = setting("prompt_last", choices=("prompt_last",),
                                          doc="every target token at the last prompt token; teacher-forced: ft-m")
    kl_factor: float = setting(0.0, minimum=0.0, maximum=0.0, doc="read by ROME's ft_main.py but never applied")


@dataclass(frozen=True)
class FineTuneMHparams(FineTuneHparams):
    editor = "ft-m"
    batch_size: int = setting(1, minimum=1, unit="cases per optimiser step")
    objective_optimization: str = setting("target_new", choices=("target_new",),
                                          doc="teacher-forced target tokens; at the last prompt token: ft-l")


class FineTuneBase(Editor):
    """Shared by FT-L and FT-M: parameters, chunking, the loop and its statistics."""

    loss_fn: Callable[..., torch.Tensor]
    hp: FineTuneHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        if not self.hp.layers:
            raise EditorError(f"{self.name}: hparams need a non-empty `layers` list")
        self.layers = list(self.hp.layers)
        self.radius = norm_radius(self.name, self.hp.norm_constraint)
        self.batch_size = self.hp.batch_size
        self.steps = self.hp.num_steps
        self.train_bias = self.hp.train_bias
        self.threshold = float(self.hp.early_stop_loss)

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return rewrite_parameter_names(self.bundle.arch.family, self.layers, self.train_bias)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        bundle = self.bundle
        weights = [parameter(bundle.model, name) for name in self.parameters_to_touch(cases)]
        originals = [w.detach().clone() for w in weights]
        chunks = [cases[i: i + self.batch_size] for i in range(0, len(cases), self.batch_size)]
        batches = [build_batch(bundle.tokenizer, [c.rewrite_prompt for c in chunk], [c.target_new for c in chunk],
                               bundle.device) for chunk in chunks]
        sizes = [len(chunk) for chunk in chunks]
        epochs = finetune(bundle.model, weights, batches, sizes, type(self).loss_fn, self.steps,
                          float(self.hp.lr), float(self.hp.weight_decay), self.radius, self.threshold)
        with torch.no_grad():
            final = sum(float(type(self).loss_fn(bundle.model, b)) * n for b, n in zip(batches, sizes)) / len(cases)
            change = max(float((w - w0).abs().max()) for w, w0 in zip(weights, originals))
        stats = {"loss_initial": epochs[0] if epochs else final, "loss_final": final, "epochs": len(epochs),
                 "max_abs_change": change, "n_cases": len(cases)}
        return EditOutcome(layers=list(self.layers), stats=stats)


class FineTuneL(FineTuneBase, hparams=FineTuneLHparams):
    """FT-L (ROME's baseline): MLP output projection fine-tuned, every target token from the last prompt token."""

    batched = True
    loss_fn = staticmethod(prompt_last_nll)
    hp: FineTuneLHparams
