"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"),
as published: the update of the reference code (kmeng01/rome `rome/rome_main.py`, `compute_u.py`,
`compute_v.py`).

The MLP output projection W of one layer l is treated as a linear associative memory
that maps keys k (its input) to values (its output). One edit:

1. Key k* (paper §3.1, eq. 3; `compute_u.py`): the flat mean, over N short prefixes x_j sampled
   from the model itself plus the bare prompt, of the out-projection input at the subject's last token.
2. δ (eq. 4; `compute_v.py`): added to the out-projection output at the subject's last token of every
   prompt and found by Adam (editors/_locate.py `optimise_shift`):
       mean_j NLL(o* | x_j + p)                                  (all target tokens, averaged per token)
     + kl_factor · KL(P_edited ‖ P_orig) at the subject's last token of the bare "{s} is a"
     + v_weight_decay · ‖δ‖ / ‖v0‖²,
   with v0 the out-projection output (bias included) at the bare prompt and ‖δ‖ ≤ clamp_norm_factor · ‖v0‖
   after every step; at most `v_num_grad_steps` passes, stopping once the total loss is below 5e-2.
3. Update (`compute_v.py`: right vector = (v* − v_bare) / (k_bareᵀ u), u = C⁻¹k*): with k_bare the key of
   the bare prompt and v* = W k_bare + δ,
       ΔW = δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_bare),   so (W + ΔW) k_bare = v*.
   C = E[k kᵀ] over a corpus sample (editors/keystats.py), or C = I when `mom2_adjustment` is false.
   Solved in float64. The mismatch of k* (numerator) and k_bare (denominator) is what makes
   sequential ROME collapse (Gupta et al. 2024); `r-rome` (editors/r_rome.py) is their fix.

Differences from the original code: the layers below the edited one run once per edit, not once per
step (editors/_locate.py); context prefixes are sampled once per model with a fixed seed from seed
words, not from "<|endoftext|>". Several cases in one `apply` are edited one after the other, each on
the already-edited model, as `apply_rome_to_model` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from editors._locate import (  # noqa: F401  (fill_subject, subject_last_index: re-exported)
    LocateHparams,
    ShiftedForward,
    check_loss_layer,
    context_prefixes,
    fill_subject,
    key_sample_args,
    optimise_shift,
    record_key_sample,
    subject_last_index,
    subject_rows,
)
from editors.base import EditOutcome, Editor
from editors.keystats import second_moment
from editors.settings import setting

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle


@dataclass
class RomeStep:
    """What one rank-one edit computed (kept on the editor for inspection and tests)."""

    case_id: str
    layer: int
    key: torch.Tensor  # the key that W + ΔW maps to `value` [d_mlp] float32
    k_star: torch.Tensor  # the prefix-averaged key in C⁻¹k* [d_mlp] float32
    value: torch.Tensor  # v* [d_model] float32
    v0: torch.Tensor  # the out-projection output (bias included) at the bare prompt, before the edit [d_model]
    delta: torch.Tensor  # δ from the optimisation [d_model]
    delta_w: torch.Tensor  # the applied update [d_model, d_mlp] float32


# --- pure functions ------------------------------------------------------------

def original_rome_update(w: torch.Tensor, c: torch.Tensor | None, left_key: torch.Tensor, right_key: torch.Tensor,
                         value: torch.Tensor) -> torch.Tensor:
    """ΔW = (v − W k_r) (C⁻¹k_l)ᵀ / ((C⁻¹k_l)ᵀ k_r) in float64; C None means identity.
    ROME's code: k_l = k*, k_r = k_bare, v = W k_bare + δ."""
    k_l, k_r = left_key.double(), right_key.double()
    u = k_l if c is None else torch.linalg.solve(c.double(), k_l)  # C⁻¹ k_l
    return torch.outer(value.double() - w.double() @ k_r, u) / (u @ k_r)


def rank_one_update(w: torch.Tensor, c: torch.Tensor | None, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """Paper eq. 2 with one key: ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) in float64 (r-ROME's update)."""
    return original_rome_update(w, c, key, key, value)


# --- the editor ------------------------------------------------------------------

@dataclass(frozen=True)
class RomeHparams(LocateHparams):
    editor = "rome"
    layers: list[int] = setting([], layer=True, length=1, required=True,
                                doc="the one layer whose MLP output projection is rewritten")


class Rome(Editor, hparams=RomeHparams):
    """ROME (Meng et al. 2022) as published: k* over context prefixes, the bare prompt's key in the denominator."""

    hp: RomeHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        check_loss_layer(self.name, bundle, self.hp)
        self.layer = self.hp.layers[0]
        record_key_sample(self.hparams, self.hp)
        self.history: list[RomeStep] = []
        self._prefixes: list[str] | None = None
        self._c: torch.Tensor | None = None

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(self.layer)]

    # -- cached ingredients --
    def prefixes(self) -> list[str]:
        """Context prefixes "x_j. " sampled from the model, plus the empty one (the bare prompt)."""
        if self._prefixes is None:
            self._prefixes = context_prefixes(self.bundle, self.hp.context_template_length_params)
        return self._prefixes

    def covariance(self) -> torch.Tensor | None:
        """C = E[k kᵀ] at the edited layer (float64), or None (identity) without mom2_adjustment."""
        if not self.hp.mom2_adjustment:
            return None
        if self._c is None:
            self._c = second_moment(self.bundle, self.layer, max_len=self.hp.mom2_max_len,
                                    **key_sample_args(self.hp)).double()
        return self._c

    def edit_one(self, case: EditCase) -> dict[str, torch.Tensor]:
        """Computes k*, v*, applies eq. 2 in place; returns device scalars for the stats."""
        fwd = ShiftedForward(self.bundle, self.layer, subject_rows(self.bundle, case, self.prefixes()))
        w = self.bundle.arch.mlp_out_matrix(self.bundle.model, self.layer)
        key_rows = fwd.keys[: fwd.rows.n_rewrite]  # [prefixes, d_mlp], the key under each prefix; row 0 bare
        v0 = fwd.values[0]  # compute_v.py `target_init`: the out-projection output at the bare prompt
        delta, stats = optimise_shift(fwd, self.hp, v0)
        key, v_star, delta_w = self.update(w, self.covariance(), key_rows, delta)
        with torch.no_grad():
            w.add_(delta_w.to(w.dtype))
        self.history.append(RomeStep(case.case_id, self.layer, key, key_rows.mean(0), v_star, v0, delta, delta_w.float()))
        del self.history[:-1]  # only the latest step: a d_model x d_mlp matrix per edit adds up over long runs
        return {**stats, "v0_norm": v0.norm(), "v_star_norm": v_star.norm(), "key_norm": key_rows.mean(0).norm(),
                "update_norm": delta_w.float().norm()}

    def update(self, w: torch.Tensor, c: torch.Tensor | None, key_rows: torch.Tensor,
               delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ROME's code: k* = mean of `key_rows` in C⁻¹k*, k_bare = row 0 in the denominator, v* = W k_bare + δ;
        returns (k_bare, v*, ΔW float64), (W + ΔW) k_bare = v*."""
        k_star, k_bare = key_rows.mean(0), key_rows[0]
        with torch.no_grad():
            v_star = w.float() @ k_bare + delta
        return k_bare, v_star, original_rome_update(w, c, k_star, k_bare, v_star)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        per_case = [self.edit_one(case) for case in cases]
        names = list(per_case[0]) if per_case else []
        table = torch.stack([torch.stack([s[n].float().to(self.bundle.device) for n in names]) for s in per_case]) \
            if per_case else torch.zeros(0, 0)
        means = table.mean(0).tolist() if per_case else []  # the one host sync
        stats: dict[str, Any] = {n: float(m) for n, m in zip(names, means)}
        stats["n_cases"] = len(cases)
        return EditOutcome(layers=[self.layer], stats=stats)
