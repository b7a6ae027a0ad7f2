"""r-ROME: ROME with the update of Gupta, Baskaran and Anumanchipalli 2024 ("Rebuilding ROME:
Resolving Model Collapse during Sequential Model Editing"), following their reference code
(scalable-model-editing/rebuilding-rome `rome/compute_v.py`, `enable_random_prefix_keys`).

k*, δ and C are computed exactly as by `rome` (editors/rome.py, editors/_locate.py: the same
optimisation, decay and clamp relative to the bare prompt's out-projection output). Only the
rank-one update differs:

- r-ROME (`enable_random_prefix_keys: true`, the reference default): the same k* in the numerator
  and the denominator; the residual is taken against the prefix-averaged value:
      v* = W k_bare + δ,   ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*),   so (W + ΔW) k* = v*.
- `enable_random_prefix_keys: false`: the original ROME code's update, identical to `rome`:
      ΔW = δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_bare),   so (W + ΔW) k_bare = W k_bare + δ.
  When (C⁻¹k*)ᵀ k_bare is small the update explodes: the "disabling edits" of sequential ROME.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editors.rome import Rome, RomeHparams, rank_one_update
from editors.settings import setting


@dataclass(frozen=True)
class RRomeHparams(RomeHparams):
    editor = "r-rome"
    enable_random_prefix_keys: bool = setting(True, doc="r-ROME's update; false: the original ROME update")


class RRome(Rome, hparams=RRomeHparams):
    """r-ROME (Gupta et al. 2024): ROME with the same k* in the update's numerator and denominator."""

    hp: RRomeHparams

    def update(self, w: torch.Tensor, c: torch.Tensor | None, key_rows: torch.Tensor,
               delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (the key that W + ΔW maps to v*, v*, ΔW float64); row 0 of key_rows is the bare prompt."""
        if not self.hp.enable_random_prefix_keys:
            return super().update(w, c, key_rows, delta)
        k_star, k_bare = key_rows.mean(0), key_rows[0]
        with torch.no_grad():
            v_star = w.float() @ k_bare + delta
        return k_star, v_star, rank_one_update(w, c, k_star, v_star)
