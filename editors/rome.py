"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

The MLP output projection W of one layer l is treated as a linear associative memory
that maps keys k (its input) to values v = W k (its output, bias excluded). One edit:

1. Key k* (paper §3.1, eq. 3): the mean, over N short prefixes x_j sampled from the model
   itself plus the bare prompt, of the out-projection input at the subject's last token.
2. Value v* (eq. 4): v* = v0 + δ with v0 = W k*. δ is added to the out-projection output at
   the subject's last token and found by Adam, minimising
       mean_j NLL(o* | x_j + p)                       (all target tokens, averaged per token)
     + kl_factor · KL(P_edited(· | p') ‖ P_orig(· | p'))  on essence prompts p' = "{s} is a"
     + v_weight_decay · ‖δ‖² / ‖v0‖²,
   with ‖δ‖ ≤ clamp_norm_factor · ‖v0‖ enforced after every step; stops early when the NLL
   falls below `v_early_stop_nll`. The loss is read at the final logits.
3. Update (eq. 2): Ŵ = W + (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*), C = E[k kᵀ] over a text
   corpus (editors/keystats.py), or C = I when `mom2_adjustment` is false. Solved in float64.

Differences from the original code, deliberate:
- The same k* is used in the numerator and the denominator, as in eq. 2. The original code
  used a differently-averaged key in the denominator; Gupta et al. 2024 ("Rebuilding ROME")
  showed this causes "disabling edits" that collapse the model. So `rome` already carries their
  fix; `r-rome` (editors/r_rome.py) differs only in its target, v* = W k_bare + δ (their code)
  instead of W k* + δ, and offers the original code's update for comparison.
- The layers below the edited one run once per edit, not once per step (editors/_locate.py).
- The KL term is taken on the essence prompt under every context prefix (the original code
  used only the bare "{s} is a"); the weight decay is ‖δ‖²/‖v0‖² (scale free).
- Context prefixes are sampled once per model with a fixed seed, shared by all editor instances.
- v0 is W k* directly (the mean of the per-prompt out-projection outputs, bias excluded).
Several cases in one `apply` are edited one after the other, each on the already-edited model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from editors._locate import (  # noqa: F401  (fill_subject, subject_last_index: re-exported)
    ShiftedForward,
    context_prefixes,
    fill_subject,
    optimise_shift,
    subject_last_index,
    subject_rows,
)
from editors.base import EditOutcome, Editor, EditorError, register
from editors.keystats import second_moment

if TYPE_CHECKING:
    from bench.data import EditCase
    from bench.models import ModelBundle


@dataclass
class RomeStep:
    """What one rank-one edit computed (kept on the editor for inspection and tests)."""

    case_id: str
    layer: int
    key: torch.Tensor  # k* [d_mlp] float32
    value: torch.Tensor  # v* [d_model] float32
    v0: torch.Tensor  # W k* before the edit [d_model]
    delta_w: torch.Tensor  # the applied update [d_model, d_mlp] float32


# --- pure functions ------------------------------------------------------------

def rank_one_update(w: torch.Tensor, c: torch.Tensor | None, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """Paper eq. 2: ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) in float64; C None means identity."""
    k = key.double()
    u = k if c is None else torch.linalg.solve(c.double(), k)  # C⁻¹ k*
    residual = value.double() - w.double() @ k
    return torch.outer(residual, u) / (u @ k)


# --- the editor ------------------------------------------------------------------

@register("rome")
class Rome(Editor):
    """ROME (Meng et al. 2022): rank-one update of one MLP output projection, k* over context prefixes."""

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        layers = hparams.get("layers", [])
        if len(layers) != 1:
            raise EditorError(f"{self.name} edits exactly one layer; got layers={layers}")
        if hparams.get("fact_token", "subject_last") != "subject_last":
            raise EditorError(f"{self.name}: only fact_token 'subject_last' is implemented")
        loss_layer = int(hparams.get("v_loss_layer", -1))  # -1: the last layer
        if loss_layer not in (-1, bundle.arch.n_layers - 1):
            raise EditorError(f"{self.name}: v_loss_layer must be the last layer ({bundle.arch.n_layers - 1}) or -1")
        self.layer = int(layers[0])
        self.history: list[RomeStep] = []
        self._prefixes: list[str] | None = None
        self._c: torch.Tensor | None = None

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(self.layer)]

    # -- cached ingredients --
    def prefixes(self) -> list[str]:
        """Context prefixes "x_j. " sampled from the model, plus the empty one (the bare prompt)."""
        if self._prefixes is None:
            self._prefixes = context_prefixes(self.bundle, self.hparams.get("context_template_length_params"))
        return self._prefixes

    def covariance(self) -> torch.Tensor | None:
        """C = E[k kᵀ] at the edited layer (float64), or None (identity) without mom2_adjustment."""
        if not self.hparams.get("mom2_adjustment", True):
            return None
        if self._c is None:
            self._c = second_moment(
                self.bundle, self.layer, corpus=str(self.hparams.get("mom2_dataset", "wikipedia")),
                n_samples=int(self.hparams.get("mom2_n_samples", 1000)),
                max_len=int(self.hparams.get("mom2_max_len", 128)),
            ).double()
        return self._c

    def edit_one(self, case: EditCase) -> dict[str, torch.Tensor]:
        """Computes k*, v*, applies eq. 2 in place; returns device scalars for the stats."""
        fwd = ShiftedForward(self.bundle, self.layer, subject_rows(self.bundle, case, self.prefixes()))
        w = self.bundle.arch.mlp_out_matrix(self.bundle.model, self.layer)
        key_rows = fwd.keys[: fwd.rows.n_rewrite]  # [prefixes, d_mlp], the key under each prefix
        k_star = key_rows.mean(0)
        with torch.no_grad():
            v0 = w.float() @ k_star
        delta, stats = optimise_shift(fwd, self.hparams, v0)
        key, v_star, delta_w = self.update(w, self.covariance(), key_rows, delta)
        with torch.no_grad():
            w.add_(delta_w.to(w.dtype))
        self.history.append(RomeStep(case.case_id, self.layer, key, v_star, v0, delta_w.float()))
        del self.history[:-1]  # only the latest step: a d_model x d_mlp matrix per edit adds up over long runs
        return {**stats, "v0_norm": v0.norm(), "v_star_norm": v_star.norm(), "key_norm": k_star.norm(),
                "update_norm": delta_w.float().norm()}

    def update(self, w: torch.Tensor, c: torch.Tensor | None, key_rows: torch.Tensor,
               delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 2 with k* = mean of `key_rows` and v* = W k* + δ; returns (k*, v*, ΔW float64)."""
        k_star = key_rows.mean(0)
        with torch.no_grad():
            v_star = w.float() @ k_star + delta
        return k_star, v_star, rank_one_update(w, c, k_star, v_star)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        per_case = [self.edit_one(case) for case in cases]
        names = list(per_case[0]) if per_case else []
        table = torch.stack([torch.stack([s[n].float().to(self.bundle.device) for n in names]) for s in per_case]) \
            if per_case else torch.zeros(0, 0)
        means = table.mean(0).tolist() if per_case else []  # the one host sync
        stats: dict[str, Any] = {n: float(m) for n, m in zip(names, means)}
        stats["n_cases"] = len(cases)
        return EditOutcome(layers=[self.layer], stats=stats)
