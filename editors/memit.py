"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023, ICLR), batched over a whole batch.

For a batch of n requests (s_i, r_i, o_i) and the layers R = `layers` (paper Alg. 1):

1. Target residual (eq. 16; memit `memit/compute_z.py`): for each request, z_i = h_i^L + δ_i with h_i^L
   the residual after the last edited layer L = max(R) at the subject's last token of the bare prompt,
   and δ_i found as in ROME (editors/_locate.py: NLL over context prefixes + kl_factor · KL at the
   subject's last token of the bare "{s} is a" + v_weight_decay · ‖δ‖/‖h^L‖², ‖δ‖ ≤ clamp_norm_factor · ‖h^L‖).
2. For each layer l in R, lowest first (Alg. 1 lines 8-13; `memit/memit_main.py`), on the model already
   edited below l:
   K_l = [k_1 … k_n], k_i the key at l averaged within each prefix group (the bare prompt; the
   prefixes of each (length, n) entry) and then over the groups (eq. 19; `memit/compute_ks.py`);
   R_l = [z_i − h_i^L(current model)] / (number of layers left, l included)   (eq. 20);
   ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹   (eq. 14 with C₀ = λ C_l, λ = mom2_update_weight),
   the minimiser of ‖(W+Δ)K_l − (W K_l + R_l)‖² + λ tr(Δ C_l Δᵀ); solved in float64.
   C_l = E[k kᵀ] over the corpus (editors/keystats.py), all layers in one pass.

Differences from the original code:
- δ is added to the MLP output of layer L rather than to the block output: the same residual shift.
- Context prefixes are sampled with ROME's generator (seed words, top-k 5, fixed seed);
  `context_template_length_params` defaults to MEMIT's [[10, 5]].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from editors._locate import (
    LocateHparams,
    ShiftedForward,
    check_layers,
    context_prefixes,
    covariances,
    keys_and_residual,
    optimise_shift,
    prefix_groups,
    record_key_sample,
    subject_rows,
)
from editors.base import EditOutcome, Editor
from editors.settings import setting

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

MEMIT_LENGTH_PARAMS = [[10, 5]]


@dataclass(frozen=True)
class MemitHparams(LocateHparams):
    editor = "memit"
    context_template_length_params: list[list[int]] = setting(
        MEMIT_LENGTH_PARAMS, minimum=0, doc="context prefixes sampled from the model: [[tokens, count], ...]")
    mom2_update_weight: float = setting(15000.0, minimum=0.0, doc="λ, the weight of C in (λC + KKᵀ)")
    layer_selection: str = setting("all", choices=("all",), doc="EasyEdit's key; only 'all' is implemented")


@dataclass
class LayerStep:
    """What one layer's update used and wrote (float64, on the model device)."""

    layer: int
    keys: torch.Tensor  # K_l [d_mlp, n]
    resid: torch.Tensor  # R_l [d_model, n], the share of the residual written into this layer
    delta_w: torch.Tensor  # ΔW_l [d_model, d_mlp], value = W @ key orientation


def memit_update(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. 14: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ in float64."""
    k, r = keys.double(), resid.double()
    adj = torch.linalg.solve(weight * c.double() + k @ k.T, k)  # (λC + KKᵀ)⁻¹ K
    return r @ adj.T


class Memit(Editor, hparams=MemitHparams):
    """MEMIT (Meng et al. 2023): residual target spread over `layers`, batched least squares per layer."""

    batched = True
    hp: MemitHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.layers = check_layers(self.name, bundle, self.hp)
        self.z_layer = self.layers[-1]
        record_key_sample(self.hparams, self.hp)
        self.last_steps: list[LayerStep] = []  # the latest apply() only
        self.last_targets: torch.Tensor | None = None  # z_i [n, d_model] of the latest apply()
        self._c: dict[int, torch.Tensor] | None = None

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(layer) for layer in self.layers]

    def prefixes(self) -> list[str]:
        return context_prefixes(self.bundle, self.length_params())

    def length_params(self) -> list[list[int]]:
        return self.hp.context_template_length_params

    def keys(self, cases: list[EditCase], layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Grouped-mean keys at `layers` ([n, d_mlp]) and the bare prompt's residual after z_layer ([n, d_model])."""
        return keys_and_residual(self.bundle, cases, self.prefixes(), layers, self.z_layer,
                                 prefix_groups(self.length_params()))

    def covariances(self) -> dict[int, torch.Tensor]:
        if self._c is None:
            self._c = covariances(self.bundle, self.layers, self.hp)
        return self._c

    def layer_update(self, index: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW_l for this method; `keys` [d_mlp, n], `resid` [d_model, n]."""
        return memit_update(keys, resid, self.covariances()[layer], self.hp.mom2_update_weight)

    def z_targets(self, cases: list[EditCase]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """z_i = h_i^L + δ_i for every case ([n, d_model] float64) and each optimisation's stats."""
        targets, stats = [], []
        for case in cases:
            fwd = ShiftedForward(self.bundle, self.z_layer, subject_rows(self.bundle, case, self.prefixes()))
            z0 = fwd.residual[0]  # row 0: the bare rewrite prompt
            delta, info = optimise_shift(fwd, self.hp, z0)
            targets.append((z0 + delta).double())
            stats.append({**info, "z0_norm": z0.norm()})
        return torch.stack(targets), stats

    def after_apply(self, cases: list[EditCase]) -> None:
        """Hook for subclasses that keep state across edits."""

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        if not cases:
            return EditOutcome(layers=list(self.layers), stats={"n_cases": 0})
        targets, per_case = self.z_targets(cases)
        self.covariances()  # every missing layer in one pass, before the first update
        arch, model = self.bundle.arch, self.bundle.model
        self.last_steps, z_errors = [], []
        for i, layer in enumerate(self.layers):
            keys, current = self.keys(cases, [layer])
            residual = (targets - current).T  # [d_model, n]
            z_errors.append(residual.norm(dim=0).mean())
            resid = residual / (len(self.layers) - i)
            delta_w = self.layer_update(i, layer, keys[layer].T, resid)
            w = arch.mlp_out_matrix(model, layer)
            with torch.no_grad():
                w.add_(delta_w.to(w.dtype))
            self.last_steps.append(LayerStep(layer, keys[layer].T, resid, delta_w))
        self.last_targets = targets
        self.after_apply(cases)
        return EditOutcome(layers=list(self.layers), stats=self._stats(per_case, z_errors, len(cases)))

    def _stats(self, per_case: list[dict[str, torch.Tensor]], z_errors: list[torch.Tensor], n: int) -> dict[str, Any]:
        names = list(per_case[0]) if per_case else []
        rows = [torch.stack([s[k].float().to(self.bundle.device) for k in names]) for s in per_case]
        extra = torch.stack([z_errors[0].float(), z_errors[-1].float(),
                             sum(s.delta_w.norm() for s in self.last_steps).float()]) if z_errors else torch.zeros(3)
        values = torch.cat([torch.stack(rows).mean(0) if rows else torch.zeros(0, device=extra.device),
                            extra.to(self.bundle.device)]).tolist()  # the one host sync
        stats: dict[str, Any] = dict(zip([*names, "z_error_first_layer", "z_error_last_layer", "update_norm"], values))
        stats["n_cases"] = n
        return stats
