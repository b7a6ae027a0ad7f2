"""WISE: a side memory with activation routing, knowledge sharding and merging (Wang et al., NeurIPS 2024,
"WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models"); the merge
variant, WISE-Merge, as EasyEdit implements it (zjunlp/EasyEdit `easyeditor/models/wise/WISE.py`).

Memories. The main memory is the MLP output projection of layer l (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`),
never changed. Here every memory is a matrix M [d_mlp, d_model] acting as out = A(x) M (+ the projection's
bias), with A(x) the MLP activation entering the projection; M_0 is the main one. The side memories are
copies of M_0: the shard being written (EasyEdit's `new_weight`), the shards saved and not yet merged, and
the merged side memory (EasyEdit swaps it in for the layer's weight).

Routing (paper eq. 4-5). For a memory M the activation score of a token is
    Δ_act(x) = ‖A(x)·(M − M_0)‖₂,
the change the memory makes to the layer's output there. A position t takes the memory with the largest
score among those whose score reaches the threshold ε = act_ratio · min over edits of the edit's in-scope
score (below), else the main memory; when no position routes the layer's own output passes through
unchanged (bitwise). The score of a position is the mean Δ_act over the input's tokens up to t (padding
excluded when the model is called with an attention mask): the causal form of EasyEdit's mean over the
whole input. The harness runs whole sequences (no KV cache); with a cache, each call would score only the
tokens it is given.

One edit (paper §3.2-3.3; EasyEdit `WISE.edit`):
1. rows: the rewrite prompt under `context_template_length_params` prefixes sampled from the model (the bare
   prompt first), each followed by target_new; and one out-of-scope text x_i, the next text of a seeded
   shuffle of `out_of_scope_corpus` (its held-out tail excluded), cut to `out_of_scope_tokens` tokens.
2. at the first edit of a shard (every `save_freq` edits) a fresh random gradient mask: each element of the
   shard is trainable with probability `mask_ratio` (Bernoulli, seeded by `seed` and the shard's index).
3. `n_iter` SGD steps (`edit_lr`, `weight_decay`) on the shard M, its gradient multiplied by the mask, of
       L = L_edit + L_act,
   L_edit the teacher-forced NLL of target_new's tokens (mean per row, then over the rows), the layers
   above l running on the shard's output; L_act the routing margin loss (paper eq. 6) with
   (α, β, γ) = `act_margin`, s_e the in-scope rows' scores (mean over each row's tokens), s_i x_i's:
       mean⁺(s_i − s_e + γ) + mean⁺(s_i − α) + mean⁺(β − s_e),
   mean⁺ the mean of the positive entries (0 if none), as in EasyEdit. After each step the shard is clipped
   into the L∞ ball of radius `norm_constraint` around M_0. EasyEdit's early stop: once two consecutive
   losses differ by ≤ 1e-4 and the last is ≤ 0.02.
4. the edit's in-scope score (mean over the in-scope rows, after training) updates the threshold's minimum.
5. every `save_freq` edits the shard is saved and a new one starts from M_0; every `merge_freq` edits the
   saved shards are merged with TIES (`merge_alg: ties`, trim to the `densities` share of largest
   magnitudes, elect the sign of the summed weighted deltas, disjoint weighted mean) into the merged side
   memory, with weight `weights`/n each the first time, then 0.4/n each plus 0.6 for the merged memory.

No parameter of the model changes: parameters_to_touch is empty; undo() removes the hooks and the memories.
Differences from EasyEdit are listed in docs/editors.md (WISE); the main ones: the score is the paper's
Δ_act (EasyEdit applies the model's hidden activation to both outputs before the difference), routing is
causal per position, and saved shards route as their own memories until the merge (EasyEdit merges them
on the first call after editing once `save_freq` edits are done).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editors._locate import context_prefixes
from editors.base import EditOutcome, Editor, EditorError, per_case_outcome
from editors.ft import norm_radius
from editors.grace import original_module
from editors.keystats import HELDOUT_TAIL
from editors.settings import Hparams, setting
from lmview.corpus import CorpusError, load_corpus
from lmview.tokens import TargetBatch, build_batch, prompt_ids

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

EARLY_STOP_DELTA, EARLY_STOP_LOSS = 1e-4, 0.02  # EasyEdit's EarlyStopMeter
LATER_MERGE_WEIGHTS = (0.4, 0.6)  # EasyEdit: later merges weigh the new shards 0.4 (shared) and the merged memory 0.6


# --- the paper's quantities, as functions -------------------------------------------------------------

def activation_scores(acts: torch.Tensor, side: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """Δ_act per token: ‖A(x)·(M_side − M_main)‖₂ over the output dimension; acts [..., d_mlp] -> [...]."""
    return (acts.float() @ (side - main)).norm(dim=-1)


def prefix_mean(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T] -> the mean score over each row's tokens up to t (masked tokens left out)."""
    weight = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
    return (scores * weight).cumsum(-1) / weight.cumsum(-1).clamp_min(1.0)


def row_mean(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> the mean score over each row's real tokens, [B]."""
    weight = mask.to(scores.dtype)
    return (scores * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries, 0 if there are none (EasyEdit's hinge averaging)."""
    positive = x[x > 0]
    return positive.mean() if positive.numel() else x.new_zeros(())


def margin_loss(in_scope: torch.Tensor, out_scope: torch.Tensor, alpha: float, beta: float, gamma: float
                ) -> torch.Tensor:
    """Paper eq. 6 as EasyEdit computes it: in_scope [E] scores of the edit's rows, out_scope [O] of x_i."""
    pairwise = out_scope.view(-1, 1) - in_scope.view(1, -1) + gamma
    return positive_mean(pairwise) + positive_mean(out_scope - alpha) + positive_mean(beta - in_scope)


def gradient_mask(shape: torch.Size, ratio: float, seed: int, shard: int) -> torch.Tensor:
    """1 where the shard may change: independent Bernoulli(ratio) elements, seeded by (seed, shard index)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(shard))
    return (torch.rand(shape, generator=generator) < ratio).float()


def ties_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], density: float
               ) -> torch.Tensor:
    """TIES (Yadav et al. 2023) as EasyEdit's GTA('magnitude', 'sum', normalize=True): each task vector
    τ_k = M_k − base keeps its round(density·n) largest-magnitude entries; the elected sign per entry is that
    of Σ_k w_k τ_k (0 counts as +); entries agreeing with it are averaged with weights w_k."""
    deltas = []
    for tensor in tensors:
        delta = (tensor - base).float()
        if density < 1:
            k = int(density * delta.numel())
            if k < 1:
                raise EditorError("wise: densities keeps no entry of a shard")
            keep = torch.zeros(delta.numel(), device=delta.device)
            keep[delta.abs().flatten().topk(k).indices] = 1
            delta = delta * keep.view_as(delta)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * base.dim())
    weighted = stacked * w
    elected = (weighted.sum(0) >= 0).to(stacked.dtype) * 2 - 1
    agree = (weighted.sign() == elected).to(stacked.dtype)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (base.float() + (weighted * agree).sum(0) / divisor).to(base.dtype)


# --- hyperparameters --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WiseHparams(Hparams):
    editor = "wise"
    layers: list[int] = setting([], layer=True, length=1, required=True,
                                doc="the layer whose MLP output projection gets the side memory "
                                    "(EasyEdit's inner_params)")
    edit_lr: float = setting(1.0, minimum=0.0, unit="SGD learning rate")
    n_iter: int = setting(70, minimum=1, unit="SGD steps per edit")
    weight_decay: float = setting(1e-5, minimum=0.0, unit="SGD weight decay", doc="EasyEdit's, hard-coded there")
    mask_ratio: float = setting(0.2, minimum=0.0, maximum=1.0, doc="share of a shard's entries its edits may change")
    norm_constraint: float | bool | None = setting(1.0, doc="L∞ radius of the shard around the main memory; "
                                                   "false: none")
    act_margin: list[float] = setting([5.0, 20.0, 10.0], length=3, minimum=0.0,
                                      doc="α, β, γ of the routing margin loss "
                                          "(out-of-scope ceiling, in-scope floor, gap)")
    act_ratio: float = setting(0.88, minimum=0.0, doc="routing threshold = act_ratio × the smallest in-scope score")
    save_freq: int = setting(500, minimum=1, unit="edits", doc="edits per shard")
    merge_freq: int = setting(1000, minimum=1, unit="edits", doc="edits between merges (a multiple of save_freq)")
    merge_alg: str = setting("ties", choices=("ties",), doc="how shards merge into the side memory")
    densities: float = setting(0.53, minimum=0.0, maximum=1.0, doc="TIES: share of each task vector kept")
    weights: float = setting(1.0, minimum=0.0, doc="TIES: total weight of the shards at the first merge")
    retrieve: bool = setting(False, choices=(False,), doc="WISE-Retrieve (top-1 shard retrieval) is not implemented")
    objective_optimization: str = setting("only_label", choices=("only_label",),
                                          doc="the loss covers target tokens only")
    context_template_length_params: list[list[int]] = setting(
        [[5, 5], [10, 5]], minimum=0, doc="prefixes sampled from the model: [[tokens, count], ...]")
    out_of_scope_corpus: str = setting("wikipedia", doc="where x_i comes from: wikipedia, or a .txt/.json/.jsonl file")
    out_of_scope_tokens: int = setting(24, minimum=2, unit="tokens", doc="x_i is cut to this length")
    seed: int = setting(0, doc="seeds the gradient masks and the order of the x_i texts")


# --- the memories -----------------------------------------------------------------------------------------

@dataclass
class SideMemories:
    """Every memory as [d_mlp, d_model] float32 (out = A @ M + bias)."""

    main: torch.Tensor
    shard: torch.Tensor
    saved: list[torch.Tensor] = field(default_factory=list)
    merged: torch.Tensor | None = None
    shard_edits: int = 0
    mask: torch.Tensor | None = None
    n_edits: int = 0
    min_score: float = float("inf")

    def candidates(self) -> list[tuple[str, torch.Tensor]]:
        """The memories routing chooses among, besides the main one."""
        out = [] if self.merged is None else [("merged", self.merged)]
        out += [(f"saved{i}", m) for i, m in enumerate(self.saved)]
        return out + ([("shard", self.shard)] if self.shard_edits else [])


class UpperForward:
    """Logits at the target positions with the output of layer l's MLP shifted by Δ [B, T, d_model].

    A gradient-free pass records the block output of layer l and the inputs of every later block; later
    calls run only the blocks above l (the layers below do not depend on the side memory)."""

    def __init__(self, bundle: ModelBundle, layer: int, batch: TargetBatch):
        self.bundle, self.layer, self.batch = bundle, layer, batch
        arch, model = bundle.arch, bundle.model
        blocks = arch.blocks(model)
        seen: dict[str, Any] = {}
        later: list[tuple[torch.nn.Module, tuple, dict]] = []
        handles = [blocks[layer].register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", _hidden(out))),
                   original_module(arch.mlp_out_proj(model, layer)).register_forward_pre_hook(
                       lambda _m, args: seen.__setitem__("acts", args[0]))]
        handles += [b.register_forward_pre_hook(lambda m, a, k: later.append((m, a, k)), with_kwargs=True)
                    for b in blocks[layer + 1:]]
        try:
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.hidden, self.acts = seen["h"], seen["acts"].detach()
        self.later = later if len(later) == len(blocks) - layer - 1 else None

    def logits(self, shift: torch.Tensor) -> torch.Tensor:
        if self.later is None:
            raise EditorError("wise: could not record the inputs of the blocks above the edited layer")
        h = self.hidden + shift.to(self.hidden.dtype)
        for module, args, kwargs in self.later:
            out = module(h, *args[1:], **kwargs) if args else module(**{**kwargs, "hidden_states": h})
            h = _hidden(out)
        h = self.bundle.arch.ln_final(self.bundle.model)(h)
        pos = self.batch.logit_pos
        picked = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.bundle.model.get_output_embeddings()(picked).float()


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def target_nll_from_logits(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """[B, J, V] logits at the target positions -> mean over rows of the per-token target NLL."""
    lp = logits.log_softmax(-1).gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1) * batch.target_mask
    return (-lp.sum(-1) / batch.target_mask.sum(-1)).mean()


# --- the editor -------------------------------------------------------------------------------------------

class Wise(Editor, hparams=WiseHparams):
    """WISE-Merge: a side copy of one MLP output projection, written in masked shards, merged with TIES,
    chosen per position by its activation score."""

    hp: WiseHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        if self.hp.merge_freq % self.hp.save_freq:
            raise EditorError(f"wise: merge_freq ({self.hp.merge_freq}) must be a multiple of save_freq "
                              f"({self.hp.save_freq})")
        self.layer = self.hp.layers[0]
        self.memories: SideMemories | None = None
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None  # the attention mask of the model call in progress
        self._texts: list[str] | None = None
        self._editing = False  # True while the editor itself runs the model: routing is off
        self.radius = norm_radius("wise", self.hp.norm_constraint)

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return []

    # -- layout of the projection --
    def _module(self) -> torch.nn.Module:
        return original_module(self.bundle.arch.mlp_out_proj(self.bundle.model, self.layer))

    def _main_matrix(self) -> torch.Tensor:
        return self.bundle.arch.mlp_out_matrix(self.bundle.model, self.layer).T.detach().float().clone()

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self._module(), "bias", None)
        return None if bias is None else bias.detach().float()

    def layer_output(self, acts: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The projection's output with `memory` in place of its weight."""
        out = acts.float() @ memory
        bias = self._bias()
        return out if bias is None else out + bias

    # -- routing --
    def threshold(self) -> float:
        assert self.memories is not None
        return float(self.hp.act_ratio) * self.memories.min_score

    def route(self, acts: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(index [B, T]: -1 for the main memory, else the candidate's position; the candidates)."""
        assert self.memories is not None
        found = self.memories.candidates()
        if not found or self.memories.min_score == float("inf"):
            return torch.full(acts.shape[:-1], -1, dtype=torch.long, device=acts.device), []
        scores = torch.stack([prefix_mean(activation_scores(acts, m, self.memories.main), mask) for _, m in found])
        best, index = scores.max(0)
        return torch.where(best >= self.threshold(), index, torch.full_like(index, -1)), [m for _, m in found]

    def _routing_hook(self, _module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.memories is None or self._editing:
            return None
        acts = args[0]
        batch_mask = self._mask if self._mask is not None and self._mask.shape == acts.shape[:-1] else None
        index, memories = self.route(acts.detach() if acts.dim() == 3 else acts[None], batch_mask)
        index = index.view(acts.shape[:-1])
        if not bool((index >= 0).any()):
            return None  # bitwise pass-through
        out = output.clone()
        for i, memory in enumerate(memories):
            chosen = index == i
            if bool(chosen.any()):
                out[chosen] = self.layer_output(acts[chosen], memory).to(out.dtype)
        return out

    def _keep_mask(self, _model: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _drop_mask(self, *_: Any) -> None:
        self._mask = None

    def _install(self) -> None:
        if self.memories is not None:
            return
        main = self._main_matrix()
        self.memories = SideMemories(main=main, shard=main.clone())
        model = self.bundle.model
        self._handles = [self._module().register_forward_hook(self._routing_hook),
                         model.register_forward_pre_hook(self._keep_mask, with_kwargs=True),
                         model.register_forward_hook(self._drop_mask)]

    def undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.memories, self._mask = [], None, None

    # -- the out-of-scope texts --
    def out_of_scope_text(self, n: int) -> str:
        if self._texts is None:
            try:
                texts, _ = load_corpus(self.hp.out_of_scope_corpus)
            except CorpusError as exc:
                raise EditorError(f"wise: out_of_scope_corpus: {exc}") from None
            tail = min(HELDOUT_TAIL.get(self.hp.out_of_scope_corpus, 0), len(texts) - 1)
            order = list(range(len(texts) - tail))
            random.Random(self.hp.seed).shuffle(order)
            self._texts = [texts[i] for i in order]
        return self._texts[n % len(self._texts)]

    def out_of_scope_acts(self, n: int) -> torch.Tensor:
        """A(x_i) at the edited layer: [T, d_mlp] for the n-th edit's out-of-scope text."""
        ids = prompt_ids(self.bundle.tokenizer, self.out_of_scope_text(n))[: self.hp.out_of_scope_tokens]
        seen: dict[str, torch.Tensor] = {}
        handle = self._module().register_forward_pre_hook(lambda _m, args: seen.__setitem__("a", args[0]))
        try:
            with torch.no_grad():
                self.bundle.model(input_ids=torch.tensor([ids], device=self.bundle.device), use_cache=False)
        finally:
            handle.remove()
        return seen["a"][0]

    # -- one edit --
    def edit_batch(self, case: EditCase) -> TargetBatch:
        prefixes = context_prefixes(self.bundle, self.hp.context_template_length_params)
        prompts = [p + case.rewrite_prompt for p in prefixes]
        return build_batch(self.bundle.tokenizer, prompts, [case.target_new] * len(prompts), self.bundle.device)

    def train_shard(self, batch: TargetBatch, outside: torch.Tensor) -> dict[str, float]:
        """The n_iter masked SGD steps on the shard; returns the losses and the edit's in-scope score."""
        mem, hp = self.memories, self.hp
        assert mem is not None and mem.mask is not None
        upper = UpperForward(self.bundle, self.layer, batch)
        alpha, beta, gamma = (float(x) for x in hp.act_margin)
        shard = mem.shard.clone().requires_grad_(True)
        opt = torch.optim.SGD([shard], lr=float(hp.edit_lr), weight_decay=float(hp.weight_decay))
        radius = self.radius
        mask = mem.mask.to(shard.device)
        previous, last, steps, first = float("inf"), float("inf"), 0, float("nan")
        for step in range(hp.n_iter):
            shift = upper.acts.float() @ (shard - mem.main)  # A(x)·(M − M0): the change of the layer's output
            in_scope = row_mean(shift.norm(dim=-1), batch.attention_mask)  # Δ_act per token, mean per row
            out_scope = activation_scores(outside, shard, mem.main).mean().view(1)
            edit_loss = target_nll_from_logits(upper.logits(shift), batch)
            act_loss = margin_loss(in_scope, out_scope, alpha, beta, gamma)
            loss = edit_loss + act_loss
            if step == 0:
                first = loss.item()
            if abs(last - previous) <= EARLY_STOP_DELTA and last <= EARLY_STOP_LOSS:
                break
            opt.zero_grad()
            loss.backward()
            shard.grad.mul_(mask)
            opt.step()
            steps += 1
            previous, last = last, loss.item()
            if radius is not None:
                with torch.no_grad():
                    shard.copy_(torch.clamp(shard, mem.main - radius, mem.main + radius))
        mem.shard = shard.detach()
        with torch.no_grad():
            final_in = row_mean(activation_scores(upper.acts, mem.shard, mem.main), batch.attention_mask)
            final_out = activation_scores(outside, mem.shard, mem.main).mean()
            final_loss = target_nll_from_logits(upper.logits(upper.acts.float() @ (mem.shard - mem.main)), batch)
            final_act = margin_loss(final_in, final_out.view(1), alpha, beta, gamma)
        return {"loss_initial": first, "loss_edit_final": float(final_loss), "loss_act_final": float(final_act),
                "steps": float(steps), "score_in_scope": float(final_in.mean()), "score_out_of_scope": float(final_out),
                "shard_change_max": float((mem.shard - mem.main).abs().max())}

    def edit_one(self, case: EditCase) -> dict[str, float]:
        mem = self.memories
        assert mem is not None
        if mem.n_edits % self.hp.save_freq == 0:
            mem.mask = gradient_mask(mem.main.shape, float(self.hp.mask_ratio), self.hp.seed,
                                     mem.n_edits // self.hp.save_freq).to(mem.main.device)
        self._editing = True  # the editor's own forward passes see the main memory only
        try:
            stats = self.train_shard(self.edit_batch(case), self.out_of_scope_acts(mem.n_edits))
        finally:
            self._editing = False
        mem.min_score = min(mem.min_score, stats["score_in_scope"])
        mem.n_edits += 1
        mem.shard_edits += 1
        if mem.n_edits % self.hp.save_freq == 0:
            mem.saved.append(mem.shard)
            mem.shard, mem.shard_edits = mem.main.clone(), 0
        merged = mem.n_edits % self.hp.merge_freq == 0
        if merged:
            self.merge()
        stats.update(threshold=self.threshold(), merged=float(merged))
        return stats

    def merge(self) -> None:
        """The saved shards into the merged side memory (TIES; EasyEdit's weights)."""
        mem, hp = self.memories, self.hp
        assert mem is not None and mem.saved
        n = len(mem.saved)
        if mem.merged is None:
            mem.merged = ties_merge(mem.main, mem.saved, [float(hp.weights) / n] * n, float(hp.densities))
        else:
            shared, own = LATER_MERGE_WEIGHTS
            mem.merged = ties_merge(mem.main, [*mem.saved, mem.merged], [shared / n] * n + [own],
                                    float(hp.densities))
        mem.saved = []

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        self._install()
        per_case = [self.edit_one(case) for case in cases]
        mem = self.memories
        assert mem is not None
        return per_case_outcome(self.layer, per_case, n_cases=len(cases), n_edits=mem.n_edits,
                                saved_shards=len(mem.saved), has_merged=float(mem.merged is not None))
