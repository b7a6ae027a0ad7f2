"""Whole-model integrity: after every restore, every parameter and buffer must be bitwise what it was
before the first edit, and no module may carry a hook that was not there before.

The fingerprint of a tensor is the sha256 of its bytes (with its dtype and shape); the check hashes the
whole model once per restore, which costs about as much as reading the weights once (see
docs/reliability.md for the measured cost next to one edit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

HOOK_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class IntegrityError(RuntimeError):
    """The model differs from its original after a restore: the run cannot go on."""


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(raw))
    return digest.hexdigest()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, by name."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def fingerprints(model: torch.nn.Module) -> dict[str, str]:
    return {name: tensor_fingerprint(t) for name, t in model_tensors(model).items()}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """One sha256 over every tensor's fingerprint, in name order: what was loaded, byte for byte."""
    digest = hashlib.sha256()
    for name, value in sorted(fingerprints(model).items()):
        digest.update(f"{name}:{value}\n".encode())
    return digest.hexdigest()


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """Module name -> number of hooks of every kind on it (modules with none left out)."""
    counts = {}
    for name, module in model.named_modules():
        count = sum(len(getattr(module, kind, {}) or {}) for kind in HOOK_KINDS)
        if count:
            counts[name or "<root>"] = count
    return counts


@dataclass
class ModelGuard:
    """The original state of a model, and the check that a restore brought it back."""

    model: torch.nn.Module
    editor: str
    original: dict[str, str]
    hooks: dict[str, int]

    @classmethod
    def of(cls, model: torch.nn.Module, editor: str) -> ModelGuard:
        return cls(model, editor, fingerprints(model), hook_counts(model))

    def problems(self, declared: Callable[[], set[str]] | None = None) -> list[str]:
        """What differs from the original: changed, added or removed tensors and extra hooks."""
        now = fingerprints(self.model)
        changed = sorted(n for n in now.keys() & self.original.keys() if now[n] != self.original[n])
        found = []
        names = {canonical(n) for n in declared()} if declared and changed else set()
        undeclared = [n for n in changed if canonical(n) not in names]
        if undeclared:
            found.append(f"changed tensors it did not declare in parameters_to_touch: {_names(undeclared)}")
        if len(undeclared) < len(changed):
            found.append(f"declared tensors not restored: {_names([n for n in changed if canonical(n) in names])}")
        added, removed = sorted(now.keys() - self.original.keys()), sorted(self.original.keys() - now.keys())
        if added or removed:
            found.append(f"tensors added {_names(added)} / removed {_names(removed)}")
        hooks = hook_counts(self.model)
        extra = sorted(n for n, k in hooks.items() if k > self.hooks.get(n, 0))
        if extra:
            found.append(f"left hooks on {_names(extra)}")
        return found

    def verify(self, declared: Callable[[], set[str]] | None = None) -> None:
        found = self.problems(declared)
        if found:
            raise IntegrityError(f"editor '{self.editor}' left the model different from its original after the "
                                 f"restore: {'; '.join(found)}")


def canonical(name: str) -> str:
    """A tensor name without the TransformerBridge's wrapper segments, as editors name it."""
    return name.replace("._original_component", "")


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"
