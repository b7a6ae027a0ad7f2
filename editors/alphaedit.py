"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025), batched.

MEMIT's targets, keys and residual spread (editors/memit.py), with each layer's update confined to
the null space of the preserved-knowledge keys K₀:

- Projection (paper §3.2, eq. 8-9): C = E[k kᵀ] over the corpus (the same key statistics as MEMIT,
  editors/keystats.py) = U Λ Uᵀ; Û = the eigenvectors whose eigenvalue is below
  `nullspace_threshold` (an absolute threshold, as the paper's 2e-2 on GPT-2 XL / Llama3); P = Û Ûᵀ.
  Then ‖P k‖² averages to Σ(eigenvalues kept) over corpus keys, so ΔW P K₀ ≈ 0.
- Update (eq. 14, with its αI written `L2` as in the reference code):
      ΔW_l = R_l K_lᵀ P (K_p K_pᵀ P + K_l K_lᵀ P + L2 · I)⁻¹,
  K_p the keys of the edits already made (sequential editing, eq. 13; AlphaEdit `AlphaEdit_main.py`
  `cache_c`), computed per layer after every apply() from the edited model and cleared by undo().
  A batch's keys join K_p only once its edit is known to have stayed in the model: the next apply()
  checks that the edited layers still hold the weights that batch left (a batch the run rolled back,
  e.g. for NaN weights, fails the check and its keys are dropped). The rows of ΔW_l lie in range(P).
  `mom2_update_weight` plays no part: P removes C's range, so λ C would vanish from the solve.
Differences from the original code: those of editors/memit.py for z and the keys; P comes from a
symmetric eigendecomposition (eigh) rather than an SVD of C (the same thing for a PSD matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from editors.base import EditOutcome, EditorError
from editors.memit import Memit, MemitHparams
from editors.settings import setting

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle


def nullspace_projector(c: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C with eigenvalue < threshold (float64)."""
    values, vectors = torch.linalg.eigh(c.double())
    kept = vectors[:, values < threshold]
    if kept.shape[1] == 0:
        raise EditorError(f"alphaedit: no eigenvalue of C is below nullspace_threshold {threshold} "
                          f"(smallest {float(values[0]):.3g}); raise the threshold")
    return kept @ kept.T


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor,
                     previous: torch.Tensor, l2: float) -> torch.Tensor:
    """ΔW = R Kᵀ P (S P + L2 I)⁻¹ with S = K Kᵀ + K_p K_pᵀ, in float64 (computed as a transposed solve)."""
    k, r, p = keys.double(), resid.double(), projector.double()
    s = k @ k.T + previous.double()
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    return torch.linalg.solve(p @ s + l2 * eye, p @ k @ r.T).T


@dataclass(frozen=True)
class AlphaEditHparams(MemitHparams):
    editor = "alphaedit"
    nullspace_threshold: float = setting(0.0, minimum=0.0, required=True,
                                         doc="eigenvalues of C below this span the protected null space")
    L2: float = setting(10.0, minimum=0.0, doc="the ridge term L2·I in the update's solve")


class AlphaEdit(Memit, hparams=AlphaEditHparams):
    """AlphaEdit (Fang et al. 2025): MEMIT's update projected on the null space of the corpus keys."""

    batched = True
    hp: AlphaEditHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self._projectors: dict[int, torch.Tensor] = {}
        self._previous: dict[int, torch.Tensor] = {}  # K_p K_pᵀ per layer, edits known to be in the model
        self._pending: tuple[list[torch.Tensor], dict[int, torch.Tensor]] | None = None  # (weights digest, K Kᵀ)

    def projector(self, layer: int) -> torch.Tensor:
        if layer not in self._projectors:
            self._projectors[layer] = nullspace_projector(self.covariances()[layer],
                                                          self.hp.nullspace_threshold)
        return self._projectors[layer]

    def nullspace_dims(self) -> dict[int, int]:
        return {layer: int(round(float(torch.trace(self.projector(layer))))) for layer in self.layers}

    def layer_update(self, index: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        d = self.bundle.arch.d_mlp
        previous = self._previous.get(layer, torch.zeros(d, d, dtype=torch.float64, device=keys.device))
        return alphaedit_update(keys, resid, self.projector(layer), previous, self.hp.L2)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        for layer in self.layers:  # a bad threshold fails before any optimisation or weight change
            self.projector(layer)
        self._settle()
        outcome = super().apply(cases)
        outcome.stats.update({f"nullspace_dim_L{layer}": dim for layer, dim in self.nullspace_dims().items()})
        return outcome

    def after_apply(self, cases: list[EditCase]) -> None:
        """Stages K Kᵀ of the batch's keys as the edited model now computes them (reference code, eq. 13);
        they join K_p at the next apply() if the weights this batch left are still in place."""
        keys, _ = self.keys(cases, list(self.layers))
        self._pending = (self._digest(), {layer: k.T @ k for layer, k in keys.items()})

    def _digest(self) -> list[torch.Tensor]:
        """Σw and Σw² (float64) of every edited weight: changed by any edit or rollback of these layers."""
        arch, model = self.bundle.arch, self.bundle.model
        return [torch.stack([w.double().sum(), w.double().pow(2).sum()])
                for w in (arch.mlp_out_matrix(model, layer).detach() for layer in self.layers)]

    def _settle(self) -> None:
        """Moves the staged keys into K_p if the model still holds the weights their batch left."""
        if self._pending is None:
            return
        digest, products = self._pending
        self._pending = None
        if all(torch.equal(a, b) for a, b in zip(digest, self._digest())):
            for layer, kk in products.items():
                self._previous[layer] = self._previous.get(layer, torch.zeros_like(kk)) + kk

    def preserved_products(self) -> dict[int, torch.Tensor]:
        """K_p K_pᵀ per layer, including the latest batch if its edit is still in the model."""
        self._settle()
        return dict(self._previous)

    def undo(self) -> None:
        self._previous.clear()
        self._pending = None
