"""EMMET: Equality-constrained Mass Model Editing (Gupta, Sajjad and Anumanchipalli 2024,
"A Unified Framework for Model Editing"), batched over a whole batch.

ROME's preservation-memorization objective with the memorization as hard equality constraints on
the whole batch: minimise ‖(W+Δ) K₀ − W K₀‖² subject to (W+Δ) k_i = W k_i + r_i for every request i.
With Lagrange multipliers the closed form (paper eq. 9) is

    ΔW = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹,   C = λ C₀ (+ μ I),  λ = mom2_update_weight, μ = update_norm_lambda,

so ΔW K = R exactly. `emmet_lambda` (ε) adds ε I to D = Kᵀ C⁻¹ K when the batch has more than one
request, as the reference code does (unified-model-editing `emmet/emmet_main.py`), so that
near-duplicate keys do not make D singular; with ε = 0, or a batch of one, the constraints hold exactly. Targets z,
keys K (averaged over context prefixes) and the spread of the residual over `layers` (divided by
the number of layers left) are MEMIT's: see editors/memit.py, whose differences apply here too.
"""

from __future__ import annotations

import torch

from editors.base import register
from editors.memit import Memit


def emmet_update(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, weight: float,
                 norm_lambda: float, emmet_lambda: float) -> torch.Tensor:
    """ΔW = R (Kᵀ C'⁻¹ K + ε I)⁻¹ Kᵀ C'⁻¹ with C' = λ C + μ I, in float64; ε only for more than one key."""
    k, r = keys.double(), resid.double()
    c_prime = weight * c.double() + norm_lambda * torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    cinv_k = torch.linalg.solve(c_prime, k)  # C'⁻¹ K
    d = k.T @ cinv_k
    if k.shape[1] > 1:
        d = d + emmet_lambda * torch.eye(k.shape[1], dtype=torch.float64, device=k.device)
    return r @ torch.linalg.solve(d, cinv_k.T)  # R D⁻¹ Kᵀ C'⁻¹


@register("emmet")
class Emmet(Memit):
    """EMMET (Gupta et al. 2024): batched ROME, the batch as equality constraints, over MEMIT's layers."""

    batched = True

    def layer_update(self, index: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return emmet_update(keys, resid, self.covariances()[layer], float(hp.get("mom2_update_weight", 1.0)),
                            float(hp.get("update_norm_lambda", 0.0)), float(hp.get("emmet_lambda", 0.1)))
