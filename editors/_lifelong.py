"""State a lifelong editor carries from one batch to the next, kept only while that batch's edit stays in the model.

In sequential mode (`bench run --sequential`) the run rolls a batch back when its edit fails (NaN weights, an
error while scoring), and the editor is not told. An editor whose next update depends on what earlier batches
did (ENCORE's keys of previous edits, UltraEdit's running normalisation statistics) therefore stages that
batch's contribution with a digest of the weights the batch left, and commits it at the next apply() only if
the edited weights still match; `undo()` drops everything.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def weights_digest(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σw and Σw² (float64) of each tensor: any edit or rollback of these tensors changes them."""
    return [torch.stack([w.detach().double().sum(), w.detach().double().pow(2).sum()]) for w in weights]


class Staged(Generic[T]):
    """A committed value, and a candidate that replaces it once its batch is known to have stayed."""

    def __init__(self, initial: T):
        self.initial = initial
        self.committed = initial
        self._pending: tuple[list[torch.Tensor], T] | None = None

    def stage(self, value: T, digest: list[torch.Tensor]) -> None:
        self._pending = (digest, value)

    def settle(self, digest: list[torch.Tensor]) -> T:
        """Commits the candidate if the weights still match the digest it was staged with; the committed value."""
        if self._pending is not None:
            staged_digest, value = self._pending
            self._pending = None
            if len(staged_digest) == len(digest) and all(torch.equal(a, b) for a, b in zip(staged_digest, digest)):
                self.committed = value
        return self.committed

    def reset(self) -> None:
        self.committed, self._pending = self.initial, None
