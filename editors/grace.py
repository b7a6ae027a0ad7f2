"""GRACE: a discrete key-value codebook adapter at one layer (Hartvigsen et al. 2023, "Aging with GRACE:
Lifelong Model Editing with Discrete Key-Value Adaptors").

The adapter wraps the MLP output projection of layer l (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`; the
module EasyEdit's GRACE wraps for Llama) with a forward hook. Its input h (the MLP's hidden activation,
d_mlp) is the query; its output is what may be replaced. The codebook holds keys k_i, values v_i and
deferral radii ε_i (paper §3, eq. 1-2):

    out(h) = v_j   if d(h, k_j) ≤ ε_j with j = argmin_i d(h, k_i)     (d: Euclidean distance)
    out(h) = W h   otherwise (the layer passes through unchanged).

The query is tested at every position. In a causal model this equals the paper's rule of querying the
last token of the input, applied to every prefix; with right padding it needs no position bookkeeping,
and it works the same under the TransformerBridge, which calls the same HF module (the hook sits on
the original module, `_original_component` when the bridge has wrapped it).

One edit (paper §3.1, Algorithm 1):
1. key k = h at the last prompt token of the rewrite prompt (computed with the unedited layer);
2. value v: initialised to the layer's original output there (`val_init: warm`) or uniformly at random
   (`cold`, EasyEdit's default), then `n_iter` Adam steps (`edit_lr`) on the teacher-forced NLL of
   target_new's tokens with v replacing the output at that position; stops early when the mean
   per-token NLL is below `early_stop_nll`;
3. codebook update with the nearest existing key k_j at distance δ: if δ > ε_init + ε_j a new entry
   (k, v, ε_init) is added; if within range and the label (target_new) is the same, ε_j grows to δ
   (`eps_expand: coverage`) and v_j is the value trained in step 2; if the labels conflict, the new entry
   is added and both radii are set to δ/2 (ε_j slightly less), so the balls no longer overlap.

No parameter of the model changes: parameters_to_touch is empty and undo() removes the hook and the
codebook. Differences from the paper/EasyEdit: only `replacement: replace_last` (per position, as
above); no value perturbation training (`val_train: sgd`); the value is trained with early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editors.base import EditOutcome, Editor, EditorError, per_case_outcome
from editors.ft import target_nll
from editors.settings import Hparams, setting
from lmview.tokens import TargetBatch, build_batch

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

CONFLICT_MARGIN = 1e-5  # the nearest radius ends this far inside δ/2 after a conflict split


@dataclass
class Codebook:
    """Keys [K, d_in], values [K, d_out], radii [K] (float32) and the label each entry was trained for."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, d_in: int, d_out: int, device: torch.device) -> Codebook:
        z = torch.zeros
        return cls(z(0, d_in, device=device), z(0, d_out, device=device), z(0, device=device), [])

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key for each query row [N, d_in]."""
        dist = torch.cdist(queries.float(), self.keys)
        return dist.min(-1)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit mask [N], value rows [N, d_out]) for the GRACE rule d(h, k_j) ≤ ε_j."""
        dist, index = self.nearest(queries)
        return dist <= self.radii[index], self.values[index]

    def insert(self, key: torch.Tensor, value: torch.Tensor, label: str, eps_init: float) -> str:
        """Paper Algorithm 1's codebook update; returns what happened: added, expanded or split."""
        if len(self):
            dist, j = (t.item() for t in self.nearest(key[None]))
            if dist <= eps_init + float(self.radii[j]):
                if self.labels[j] == label:
                    self.radii[j] = max(float(self.radii[j]), dist)
                    self.values[j] = value
                    return "expanded"
                self._add(key, value, label, dist / 2)
                self.radii[j] = dist / 2 - CONFLICT_MARGIN
                return "split"
        self._add(key, value, label, eps_init)
        return "added"

    def _add(self, key: torch.Tensor, value: torch.Tensor, label: str, radius: float) -> None:
        self.keys = torch.cat([self.keys, key[None].float()])
        self.values = torch.cat([self.values, value[None].float()])
        self.radii = torch.cat([self.radii, torch.tensor([radius], device=self.radii.device)])
        self.labels.append(label)


def original_module(module: torch.nn.Module) -> torch.nn.Module:
    """The HF module itself, also when TransformerLens's bridge has wrapped it."""
    return getattr(module, "_original_component", module)


@dataclass(frozen=True)
class GraceHparams(Hparams):
    editor = "grace"
    layers: list[int] = setting([], layer=True, length=1, required=True,
                                doc="the one layer whose MLP output the codebook adapts")
    replacement: str = setting("replace_last", choices=("replace_last",), doc="which positions a hit replaces")
    val_init: str = setting("warm", choices=("warm", "cold"), doc="a new value starts as the layer's output, or random")
    eps: float = setting(1.0, minimum=0.0, unit="key-space distance", doc="a new entry's deferral radius (> 0)")
    eps_expand: str = setting("coverage", choices=("coverage",), doc="how radii grow on a same-label hit")
    edit_lr: float = setting(1.0, minimum=0.0, unit="Adam learning rate", doc="for a new value")
    n_iter: int = setting(50, minimum=1, unit="Adam steps", doc="per new value")
    early_stop_nll: float = setting(1e-2, unit="nats", doc="a value's training stops below this NLL")
    seed: int = setting(0, doc="seeds a cold value")


class Grace(Editor, hparams=GraceHparams):
    """GRACE (Hartvigsen et al. 2023): key-value codebook with deferral radii at one MLP; no weight change."""

    hp: GraceHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        if self.hp.eps <= 0:
            raise EditorError("grace: eps must be positive")
        self.layer = self.hp.layers[0]
        self.codebook: Codebook | None = None
        self._handle: Any = None
        self._forced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, positions, value

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return []

    # -- the hook --
    def _module(self) -> torch.nn.Module:
        return original_module(self.bundle.arch.mlp_out_proj(self.bundle.model, self.layer))

    def _hook(self, _module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._forced is not None:  # value training: replace at the given positions
            rows, positions, value = self._forced
            out = output.clone()
            out[rows, positions] = value.to(out.dtype)
            return out
        if self.codebook is None or not len(self.codebook):
            return None
        query = args[0]
        hit, values = self.codebook.lookup(query.reshape(-1, query.shape[-1]))
        if not bool(hit.any()):
            return None  # bitwise pass-through
        hit = hit.view(*query.shape[:-1], 1)
        return torch.where(hit, values.view(*output.shape).to(output.dtype), output)

    def _install(self) -> None:
        if self._handle is None:
            arch = self.bundle.arch
            d_in, d_out = arch.d_mlp, arch.d_model
            self.codebook = Codebook.empty(d_in, d_out, self.bundle.device)
            self._handle = self._module().register_forward_hook(self._hook)

    def undo(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.codebook, self._forced = None, None, None

    # -- one edit --
    @torch.no_grad()
    def _key_and_output(self, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input and original output at the last prompt token of row 0."""
        seen: dict[str, torch.Tensor] = {}

        def capture(_m: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen["in"], seen["out"] = args[0], output

        handle = self._module().register_forward_hook(capture)
        saved, self._forced = self._forced, None
        try:
            self.bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            handle.remove()
            self._forced = saved
        pos = int(batch.last_prompt_pos[0])
        return seen["in"][0, pos].float().clone(), seen["out"][0, pos].float().clone()

    def _train_value(self, batch: TargetBatch, init: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        value = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=float(self.hp.edit_lr))
        steps, threshold = self.hp.n_iter, float(self.hp.early_stop_nll)
        rows = torch.zeros(1, dtype=torch.long, device=self.bundle.device)
        self._forced = (rows, batch.last_prompt_pos[:1], value)
        try:
            for step in range(steps + 1):
                loss = target_nll(self.bundle.model, batch)
                if step == 0:
                    first = loss.item()
                if step == steps or loss.item() < threshold:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            self._forced = None
        return value.detach(), {"loss_initial": first, "loss_final": loss.item(), "steps": float(step)}

    def edit_one(self, case: EditCase) -> dict[str, float]:
        batch = build_batch(self.bundle.tokenizer, [case.rewrite_prompt], [case.target_new], self.bundle.device)
        key, original_out = self._key_and_output(batch)
        if self.hp.val_init == "warm":
            init = original_out
        else:
            generator = torch.Generator(device="cpu").manual_seed(self.hp.seed)
            init = torch.rand(original_out.shape, generator=generator).to(original_out.device)
        value, stats = self._train_value(batch, init)
        assert self.codebook is not None
        action = self.codebook.insert(key, value, case.target_new, float(self.hp.eps))
        stats.update({"key_norm": float(key.norm()), "value_shift": float((value - original_out).norm()),
                      "added": float(action == "added"), "expanded": float(action == "expanded"),
                      "split": float(action == "split")})
        return stats

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        self._install()
        per_case = [self.edit_one(case) for case in cases]
        assert self.codebook is not None
        return per_case_outcome(self.layer, per_case, n_cases=len(cases), codebook_size=len(self.codebook))
