"""r-ROME: ROME with the update of Gupta, Baskaran and Anumanchipalli 2024 ("Rebuilding ROME:
Resolving Model Collapse during Sequential Model Editing"), following their reference code.

k* (ROME eq. 3, the key averaged over the context prefixes, bare prompt included), δ (ROME eq. 4)
and C are computed exactly as by `rome` (editors/rome.py, editors/_locate.py; δ's decay and clamp
are relative to ‖W k*‖, as in `rome`). Only the rank-one update differs:

- r-ROME (paper eq. 6-7, `enable_random_prefix_keys: true`, the default): the same k* in the
  numerator and the denominator, and the target value is the bare prompt's value plus δ:
      v* = W k_b + δ,   ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*),   so (W + ΔW) k* = v*,
  with k_b the key of the bare prompt (no prefix).
- The original ROME code (`enable_random_prefix_keys: false`, for comparison): the left vector
  uses k*, but the residual and the denominator use k_b:
      v* = W k_b + δ,   ΔW = δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_b),   so (W + ΔW) k_b = v*.
  When (C⁻¹k*)ᵀ k_b is small the update explodes: the "disabling edits" of sequential ROME.

How `rome` differs from r-rome: `rome` already uses k* in both places, but its target is
v* = W k* + δ. Given the same δ (the optimisation is shared and deterministic),
    ΔW_r-rome − ΔW_rome = W (k_b − k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*),
a rank-one term in the same row space; tests/test_editors_locate.py checks exactly this.
"""

from __future__ import annotations

import torch

from editors.base import register
from editors.rome import Rome, rank_one_update


def original_rome_update(w: torch.Tensor, c: torch.Tensor | None, left_key: torch.Tensor, right_key: torch.Tensor,
                         value: torch.Tensor) -> torch.Tensor:
    """ΔW = (v − W k_r) (C⁻¹k_l)ᵀ / ((C⁻¹k_l)ᵀ k_r) in float64; C None means identity."""
    k_l, k_r = left_key.double(), right_key.double()
    u = k_l if c is None else torch.linalg.solve(c.double(), k_l)
    return torch.outer(value.double() - w.double() @ k_r, u) / (u @ k_r)


@register("r-rome")
class RRome(Rome):
    """r-ROME (Gupta et al. 2024): ROME with the same k* in the update's numerator and denominator."""

    def update(self, w: torch.Tensor, c: torch.Tensor | None, key_rows: torch.Tensor,
               delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (the key that W + ΔW maps to v*, v*, ΔW float64); row 0 of key_rows is the bare prompt."""
        k_star, k_bare = key_rows.mean(0), key_rows[0]
        with torch.no_grad():
            v_star = w.float() @ k_bare + delta
        if self.hparams.get("enable_random_prefix_keys", True):
            return k_star, v_star, rank_one_update(w, c, k_star, v_star)
        return k_bare, v_star, original_rome_update(w, c, k_star, k_bare, v_star)
