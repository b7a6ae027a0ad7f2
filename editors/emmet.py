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

from dataclasses import dataclass

import torch

from editors.memit import Memit, MemitHparams
from editors.settings import setting


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


@dataclass(frozen=True)
class EmmetHparams(MemitHparams):
    editor = "emmet"
    mom2_update_weight: float = setting(1.0, minimum=0.0, doc="λ, the scale of C in C' = λC + μI")
    update_norm_lambda: float = setting(0.0, minimum=0.0, doc="μ in C' = λC + μI")
    emmet_lambda: float = setting(0.1, minimum=0.0, doc="ε added to D = KᵀC'⁻¹K for batches of more than one")


class Emmet(Memit, hparams=EmmetHparams):
    """EMMET (Gupta et al. 2024): batched ROME, the batch as equality constraints, over MEMIT's layers."""

    batched = True
    hp: EmmetHparams

    def layer_update(self, index: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        return emmet_update(keys, resid, self.covariances()[layer], hp.mom2_update_weight, hp.update_norm_lambda,
                            hp.emmet_lambda)
