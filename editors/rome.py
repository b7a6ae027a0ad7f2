"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

The MLP output projection W of one layer l is treated as a linear associative memory
that maps keys k (its input) to values v = W k (its output, bias excluded). One edit:

1. Key k* (paper §3.1, eq. 3): the mean, over N short prefixes x_j sampled from the model
   itself plus the bare prompt, of the out-projection input at the subject's last token.
2. Value v* (eq. 4): v* = v0 + δ with v0 = W k*. δ is added to the out-projection output at
   the subject's last token and found by Adam, minimising
       mean_j NLL(o* | x_j + p)                       (all target tokens, averaged per token)
     + kl_factor · KL(P_edited(· | p') ‖ P_orig(· | p'))  on essence prompts p' = "{s} is a"
     + v_weight_decay · ‖δ‖² / ‖v0‖²,
   with ‖δ‖ ≤ clamp_norm_factor · ‖v0‖ enforced after every step; stops early when the NLL
   falls below `v_early_stop_nll`. The loss is read at the final logits.
3. Update (eq. 2): Ŵ = W + (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*), C = E[k kᵀ] over a text
   corpus (editors/keystats.py), or C = I when `mom2_adjustment` is false. Solved in float64.

Differences from the original code, deliberate:
- The same k* is used in the numerator and the denominator, as in eq. 2. The original code
  used a differently-averaged key in the denominator; Gupta et al. 2024 ("Rebuilding ROME")
  showed this causes "disabling edits" that collapse the model.
- The KL term is taken on the essence prompt under every context prefix (the original code
  used only the bare "{s} is a"); the weight decay is ‖δ‖²/‖v0‖² (scale free).
- Context prefixes are sampled once per editor instance with a fixed seed.
- v0 is W k* directly (the mean of the per-prompt out-projection outputs, bias excluded).
Several cases in one `apply` are edited one after the other, each on the already-edited model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bench.tokens import TargetBatch, build_batch, prompt_ids
from editors.base import EditOutcome, Editor, EditorError, register
from editors.keystats import second_moment

if TYPE_CHECKING:
    from bench.data import EditCase
    from bench.models import ModelBundle

SEED_WORDS = ("The", "A", "In", "It", "When", "After", "This", "One", "We", "There")
ESSENCE_PROMPT = "{} is a"
CONTEXT_SEED = 1234
CONTEXT_TOP_K = 5


@dataclass
class RomeStep:
    """What one rank-one edit computed (kept on the editor for inspection and tests)."""

    case_id: str
    layer: int
    key: torch.Tensor  # k* [d_mlp] float32
    value: torch.Tensor  # v* [d_model] float32
    v0: torch.Tensor  # W k* before the edit [d_model]
    delta_w: torch.Tensor  # the applied update [d_model, d_mlp] float32


# --- pure functions ------------------------------------------------------------

def rank_one_update(w: torch.Tensor, c: torch.Tensor | None, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """Paper eq. 2: ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) in float64; C None means identity."""
    k = key.double()
    u = k if c is None else torch.linalg.solve(c.double(), k)  # C⁻¹ k*
    residual = value.double() - w.double() @ k
    return torch.outer(residual, u) / (u @ k)


def subject_last_index(tokenizer: Any, text: str, subject_end: int) -> int:
    """Index (in prompt_ids(text)) of the token holding the subject's last character."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(spans) if b > a and a < subject_end]
        if hits:
            return hits[-1]
    return len(prompt_ids(tokenizer, text[:subject_end])) - 1  # slow tokenizers: prefix length


def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """Puts the subject into the first "{}"; returns the text and the character index where it ends."""
    at = template.index("{}")
    return template[:at] + subject + template[at + 2 :], at + len(subject)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()


# --- the editor ------------------------------------------------------------------

@register("rome")
class Rome(Editor):
    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        layers = hparams.get("layers", [])
        if len(layers) != 1:
            raise EditorError(f"rome edits exactly one layer; got layers={layers}")
        if hparams.get("fact_token", "subject_last") != "subject_last":
            raise EditorError("rome: only fact_token 'subject_last' is implemented")
        loss_layer = int(hparams.get("v_loss_layer", -1))  # -1: the last layer
        if loss_layer not in (-1, bundle.arch.n_layers - 1):
            raise EditorError(f"rome: v_loss_layer must be the last layer ({bundle.arch.n_layers - 1}) or -1")
        self.layer = int(layers[0])
        self.history: list[RomeStep] = []
        self._prefixes: list[str] | None = None
        self._c: torch.Tensor | None = None

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(self.layer)]

    # -- cached ingredients --
    def prefixes(self) -> list[str]:
        """Context prefixes "x_j. " sampled from the model, plus the empty one (the bare prompt)."""
        if self._prefixes is None:
            params = self.hparams.get("context_template_length_params", [[5, 10], [10, 10]])
            self._prefixes = [""] + [_clean(t) + ". " for t in self._sample_contexts(params)]
        return self._prefixes

    def covariance(self) -> torch.Tensor | None:
        """C = E[k kᵀ] at the edited layer (float64), or None (identity) without mom2_adjustment."""
        if not self.hparams.get("mom2_adjustment", True):
            return None
        if self._c is None:
            self._c = second_moment(
                self.bundle, self.layer, corpus=str(self.hparams.get("mom2_dataset", "wikipedia")),
                n_samples=int(self.hparams.get("mom2_n_samples", 1000)),
                max_len=int(self.hparams.get("mom2_max_len", 128)),
            ).double()
        return self._c

    @torch.no_grad()
    def _sample_contexts(self, length_params: list[list[int]]) -> list[str]:
        """One batched `generate`: n continuations per (length, n), cut to that many new tokens."""
        tok, dev = self.bundle.tokenizer, self.bundle.device
        plan = [int(length) for length, n in length_params for _ in range(int(n))]
        seeds = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(len(plan))]
        rows = [prompt_ids(tok, s) for s in seeds]
        width, pad = max(map(len, rows)), tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)  # left padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(CONTEXT_SEED)
            out = self.bundle.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=CONTEXT_TOP_K,
                max_new_tokens=max(plan), min_new_tokens=max(plan), pad_token_id=pad,
            )
        new = out[:, width:].tolist()
        return [s + tok.decode(new[i][: plan[i]], skip_special_tokens=True) for i, s in enumerate(seeds)]

    # -- one edit --
    def _prompts(self, template: str, subject: str) -> tuple[list[str], list[int]]:
        """The template under every prefix, subject filled in, and the subject-last token indices."""
        texts, ends = zip(*(fill_subject(p + template, subject) for p in self.prefixes()))
        idx = [subject_last_index(self.bundle.tokenizer, t, e) for t, e in zip(texts, ends)]
        return list(texts), idx

    def _batch(self, case: EditCase) -> tuple[TargetBatch, torch.Tensor, int]:
        """Rewrite rows then essence rows in one batch; returns it, the [B, T, 1] subject selector, n rewrite rows."""
        rewrite, r_idx = self._prompts(case.prompt, case.subject)
        essence, e_idx = self._prompts(ESSENCE_PROMPT, case.subject)
        batch = build_batch(self.bundle.tokenizer, rewrite + essence, [case.target_new] * (len(rewrite) + len(essence)),
                            self.bundle.device)
        sel = torch.zeros(batch.input_ids.shape, dtype=self.bundle.dtype)
        sel[torch.arange(len(r_idx + e_idx)), torch.tensor(r_idx + e_idx)] = 1
        return batch, sel.unsqueeze(-1).to(self.bundle.device), len(rewrite)

    def _logits(self, batch: TargetBatch) -> torch.Tensor:
        """Logits at the target-predicting positions only: [B, J, V] (skips the LM head elsewhere)."""
        model = self.bundle.model
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state
        picked = hidden.gather(1, batch.logit_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return model.get_output_embeddings()(picked).float()

    def _run(self, batch: TargetBatch, sel: torch.Tensor, delta: torch.Tensor | None,
             keys: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Forward with δ added to the out-projection output at the subject positions; optionally records keys."""
        proj = self.bundle.arch.mlp_out_proj(self.bundle.model, self.layer)
        handles = []
        if delta is not None:
            handles.append(proj.register_forward_hook(lambda _m, _a, out: out + sel * delta.to(out.dtype)))
        if keys is not None:
            handles.append(proj.register_forward_pre_hook(lambda _m, args: keys.append(args[0])))
        try:
            return self._logits(batch)
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _target_logprobs(logits: torch.Tensor, batch: TargetBatch, rows: int) -> torch.Tensor:
        """Per-row [rows, J] log-probs of the target tokens (0 where masked)."""
        lp = logits[:rows].log_softmax(-1).gather(-1, batch.target_ids[:rows].unsqueeze(-1)).squeeze(-1)
        return lp * batch.target_mask[:rows]

    def edit_one(self, case: EditCase) -> dict[str, torch.Tensor]:
        """Computes k*, v*, applies eq. 2 in place; returns device scalars for the stats."""
        hp = self.hparams
        batch, sel, n_rw = self._batch(case)
        w = self.bundle.arch.mlp_out_matrix(self.bundle.model, self.layer)
        with torch.no_grad():
            keys: list[torch.Tensor] = []
            logits0 = self._run(batch, sel, None, keys)
            key_rows = (keys[0] * sel).sum(1).float()  # [B, d_mlp], the key at each row's subject token
            k_star = key_rows[:n_rw].mean(0)
            v0 = w.float() @ k_star
            orig_kl_lp = logits0[n_rw:, 0].log_softmax(-1)
            n_tok = batch.target_mask[:n_rw].sum(-1)
            lp_before = self._target_logprobs(logits0, batch, n_rw).sum(-1)

        delta = torch.zeros_like(v0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=float(hp.get("v_lr", 0.5)))
        max_norm = float(hp.get("clamp_norm_factor", 4.0)) * v0.norm()
        steps, threshold = int(hp.get("v_num_grad_steps", 20)), float(hp.get("v_early_stop_nll", 5e-2))
        for step in range(steps + 1):
            logits = self._run(batch, sel, delta)
            lp = self._target_logprobs(logits, batch, n_rw).sum(-1)
            nll = (-lp / n_tok).mean()
            edit_lp = logits[n_rw:, 0].log_softmax(-1)
            kl = (edit_lp.exp() * (edit_lp - orig_kl_lp)).sum(-1).mean()  # KL(edited ‖ original)
            decay = delta.pow(2).sum() / v0.pow(2).sum()
            loss = nll + float(hp.get("kl_factor", 0.0625)) * kl + float(hp.get("v_weight_decay", 0.5)) * decay
            if step == steps or nll.item() < threshold:  # one host sync per step, for the early stop
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.mul_((max_norm / delta.norm().clamp_min(1e-12)).clamp(max=1.0))

        v_star = (v0 + delta).detach()
        c = self.covariance()
        delta_w = rank_one_update(w, c, k_star, v_star).to(w.dtype)
        with torch.no_grad():
            w.add_(delta_w)
        self.history.append(RomeStep(case.case_id, self.layer, k_star, v_star, v0, delta_w.float()))
        return {
            "v_loss_final": nll.detach(), "v_loss_total": loss.detach(), "kl_final": kl.detach(),
            "v_steps": torch.tensor(float(step)), "delta_norm": delta.detach().norm(),
            "v0_norm": v0.norm(), "v_star_norm": v_star.norm(), "key_norm": k_star.norm(),
            "update_norm": delta_w.float().norm(),
            "target_prob_before": lp_before.exp().mean(), "target_prob_after_opt": lp.detach().exp().mean(),
        }

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        per_case = [self.edit_one(case) for case in cases]
        names = list(per_case[0]) if per_case else []
        table = torch.stack([torch.stack([s[n].float().to(self.bundle.device) for n in names]) for s in per_case]) \
            if per_case else torch.zeros(0, 0)
        means = table.mean(0).tolist() if per_case else []  # the one host sync
        stats: dict[str, Any] = {n: float(m) for n, m in zip(names, means)}
        stats["n_cases"] = len(cases)
        return EditOutcome(layers=[self.layer], stats=stats)
