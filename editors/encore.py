"""ENCORE: Early stopping and Norm-Constrained Robust knowledge Editing (Gupta et al. 2025, "Lifelong Sequential
Knowledge Editing without Model Degradation"), batched.

MEMIT (editors/memit.py: the residual target z, the keys, the residual spread over `layers`) with two changes:

1. Most-probable early stopping, MPES (paper §5; scalable-model-editing/encore `encore/compute_z.py`). δ's
   optimisation checks, after every forward pass and before that pass's Adam step, whether every target token
   is the most probable token at its position in every rewrite prompt (the bare prompt and each context
   prefix, teacher forced). `prob_cutoff` < 0: stop at the |prob_cutoff|-th pass at which this holds (-1: the
   first; the authors' Llama3-8B file uses -2, GPT-2 XL -4). `prob_cutoff` > 0: stop once the mean over
   rewrite prompts of exp(−per-token NLL) exceeds it. 0: off (MEMIT's loop). MEMIT's own stops (total loss
   below `v_early_stop_loss`, `v_num_grad_steps`) still apply.
2. A Frobenius-norm constraint on each update (paper §6, the objective
       λ‖ΔW K₀‖² + ‖ΔW K_p‖² + ‖(W + ΔW) K − (W K + R)‖² + α‖ΔW‖²,
   W the weights before this batch, α = `update_norm_lambda`), whose minimiser is
       ΔW_l = R_l K_lᵀ (λ C_l + α I + K_p K_pᵀ + K_l K_lᵀ)⁻¹      (`encore/encore_main.py`),
   with λ = `mom2_update_weight`, C_l = E[k kᵀ] (editors/keystats.py), and K_p the keys of the edits already
   made in this run (`add_prev_edits`, the authors' SEQ_CACHE; sequential mode only, since the harness clears
   them with undo() after every non-sequential case). For any C and K_p, ‖ΔW_l‖_F ≤ ‖R_l‖_F / (2√α).

A batch's keys join K_p once the next apply() finds the edited layers still holding the weights that batch
left (editors/_lifelong.py); the keys are those the update used, which later layers' updates do not change.

Differences from the authors' code (besides editors/memit.py's, e.g. the context-prefix sampler):
- MPES checks the bare prompt too, and all target tokens: the authors' check drops row 0 (the bare prompt;
  its comment calls it the KL prompt) and compares the count of top-1 target tokens with a hard-coded 5
  (the number of context prefixes, right for one-token targets only).
- The update is solved in float64 on the model device, as MEMIT's here; `norm_control`, `emmet_lambda`,
  `dynamic_multiplier` and `random_vector_preservation` are keys of their file that ENCORE's code never reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from editors._lifelong import Staged, weights_digest
from editors._locate import ShiftedForward, optimise_shift, subject_rows
from editors.base import EditOutcome
from editors.memit import Memit, MemitHparams
from editors.settings import setting
from lmview.tokens import TargetBatch

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle


@dataclass(frozen=True)
class EncoreHparams(MemitHparams):
    editor = "encore"
    prob_cutoff: float = setting(-2.0, doc="MPES: < 0 stop at the |n|-th pass with every target token top-1; "
                                           "> 0 stop above this mean target probability; 0 off")
    update_norm_lambda: float = setting(10.0, minimum=0.0, doc="α, the weight of ‖ΔW‖²_F (α I in the solve)")
    add_prev_edits: bool = setting(True, doc="sequential mode: the keys of earlier edits (K_p) join the solve")


def encore_update(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, weight: float, norm_lambda: float,
                  previous: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = R Kᵀ (λ C + α I + K_p K_pᵀ + K Kᵀ)⁻¹ in float64; `keys` [d_mlp, n], `resid` [d_model, n]."""
    k, r = keys.double(), resid.double()
    a = weight * c.double() + k @ k.T
    a = a + norm_lambda * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    if previous is not None:
        a = a + previous.double()
    return r @ torch.linalg.solve(a, k).T


class MostProbableStop:
    """MPES as a stop rule for `optimise_shift`: counts the forward passes at which every target token of every
    rewrite prompt is the argmax (prob_cutoff < 0), or compares the mean target probability (> 0)."""

    def __init__(self, batch: TargetBatch, n_rewrite: int, prob_cutoff: float):
        self.pos = batch.logit_pos[:n_rewrite]
        self.targets = batch.target_ids[:n_rewrite]
        self.mask = batch.target_mask[:n_rewrite]
        self.cutoff = float(prob_cutoff)
        self.hits = 0
        self.fired = False

    def all_most_probable(self, logits: torch.Tensor) -> bool:
        """logits [rows, J, V] at the target positions (ShiftedForward's layout)."""
        top = logits[: self.targets.shape[0]].argmax(-1)
        return bool(((top == self.targets) | ~self.mask).all())

    def mean_probability(self, logits: torch.Tensor) -> float:
        lp = logits[: self.targets.shape[0]].log_softmax(-1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        per_row = (lp * self.mask).sum(-1) / self.mask.sum(-1)
        return float(per_row.exp().mean())

    def __call__(self, logits: torch.Tensor) -> bool:
        if self.cutoff < 0:
            self.hits += self.all_most_probable(logits)
            self.fired = self.hits >= abs(self.cutoff)
        elif self.cutoff > 0:
            self.fired = self.mean_probability(logits) > self.cutoff
        return self.fired


class Encore(Memit, hparams=EncoreHparams):
    """ENCORE (Gupta et al. 2025): MEMIT with most-probable early stopping and a Frobenius-norm penalty on ΔW."""

    batched = True
    hp: EncoreHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self._previous: Staged[dict[int, torch.Tensor]] = Staged({})  # K_p K_pᵀ per layer

    def z_targets(self, cases: list[EditCase]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """MEMIT's z_i with MPES added to δ's optimisation."""
        targets, stats = [], []
        for case in cases:
            rows = subject_rows(self.bundle, case, self.prefixes())
            fwd = ShiftedForward(self.bundle, self.z_layer, rows)
            z0 = fwd.residual[0]
            rule = MostProbableStop(rows.batch, rows.n_rewrite, self.hp.prob_cutoff)
            delta, info = optimise_shift(fwd, self.hp, z0, stop=rule if self.hp.prob_cutoff else None)
            targets.append((z0 + delta).double())
            stats.append({**info, "z0_norm": z0.norm(),
                          "mpes_stopped": torch.tensor(float(rule.fired), device=z0.device)})
        return torch.stack(targets), stats

    def previous_products(self) -> dict[int, torch.Tensor]:
        """K_p K_pᵀ per layer: the edits of this run that are still in the model."""
        return self._previous.settle(self._digest())

    def layer_update(self, index: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        previous = self.previous_products().get(layer) if self.hp.add_prev_edits else None
        return encore_update(keys, resid, self.covariances()[layer], self.hp.mom2_update_weight,
                             self.hp.update_norm_lambda, previous)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        self.previous_products()  # settle the last batch before any weight changes
        return super().apply(cases)

    def after_apply(self, cases: list[EditCase]) -> None:
        """Stages K Kᵀ of this batch's keys (those the updates used) for K_p."""
        products = dict(self._previous.committed)
        for step in self.last_steps:
            kk = step.keys @ step.keys.T
            products[step.layer] = products[step.layer] + kk if step.layer in products else kk
        self._previous.stage(products, self._digest())

    def _digest(self) -> list[torch.Tensor]:
        arch, model = self.bundle.arch, self.bundle.model
        return weights_digest([arch.mlp_out_matrix(model, layer) for layer in self.layers])

    def undo(self) -> None:
        self._previous.reset()
