"""The logit lens of one prompt: each layer's residual stream read through the model's own output head.

After block l the residual stream at the prompt's last position, h_l, is mapped to vocabulary logits with
the model's final norm and unembedding, logits_l = W_U · norm_f(h_l) (nostalgebraist's logit lens, as
KnowledgeCircuits' notebooks read ROME- and FT-edited models). At the last layer this is the model's own
output. For a target answer the lens keeps its first token's rank (1 = the top token; ties are broken in
the target's favour) and probability (softmax over the vocabulary) at every layer.

The same forward pass records each head's attention from the last position to the subject's tokens (their
summed attention weights; the subject's last occurrence in the prompt, so an in-context demonstration that
names the subject earlier does not count), which is how mover heads are read (KC §4: heads that move the
subject's information to the last token).

One forward pass with hooks per prompt; attention weights come from the eager attention implementation,
switched on for that pass only (or from TransformerLens's bridge when it wraps the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.tracing import subject_token_range, traced_module
from lmview.arch import ArchSpec
from lmview.tokens import prompt_ids, target_ids

PROB_DIGITS = 4  # significant digits kept in cases.jsonl
ATTENTION_DECIMALS = 3


@dataclass
class PromptLens:
    """One prompt through the layers: per layer, the final-position residual stream and each head's
    attention row from the last position ([n_heads, T]; None when the model gave no attention weights)."""

    residual: torch.Tensor  # [L, d_model]
    attention: list[torch.Tensor | None]
    n_tokens: int


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face attention modules return their weights only in the eager implementation."""
    config = model.config
    old = getattr(config, "_attn_implementation", None)
    if old is None:
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = old


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def read_prompt(model: nn.Module, arch: ArchSpec, ids: list[int]) -> PromptLens:
    """One forward pass: the residual stream after every block at the last position, and every layer's
    attention weights from the last position."""
    device = next(model.parameters()).device
    residual: list[torch.Tensor | None] = [None] * arch.n_layers
    attention: list[torch.Tensor | None] = [None] * arch.n_layers
    handles = []
    for layer in range(arch.n_layers):
        def keep_residual(_m, _i, out, layer=layer):
            residual[layer] = _first(out)[0, -1].detach().float().clone()

        def keep_attention(_m, _i, out, layer=layer):
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if isinstance(weights, torch.Tensor) and weights.dim() == 4:
                attention[layer] = weights[0, :, -1].detach().float().clone()  # [heads, T]

        handles.append(traced_module(model, arch, "hidden", layer).register_forward_hook(keep_residual))
        handles.append(traced_module(model, arch, "attn", layer).register_forward_hook(keep_attention))
    try:
        with eager_attention(model):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return PromptLens(torch.stack(residual), attention, len(ids))  # type: ignore[arg-type]


@torch.no_grad()
def unembed(model: nn.Module, arch: ArchSpec, residual: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of residual-stream vectors [..., d_model] through the final norm and unembedding."""
    norm = arch.ln_final(model)
    head = model.get_output_embeddings()
    dtype = next(head.parameters()).dtype
    return head(norm(residual.to(dtype))).float()


def rank_and_prob(logits: torch.Tensor, token: int) -> tuple[list[int], list[float]]:
    """Per row of [L, vocab] logits: the token's rank (1 = top; ties in its favour) and softmax probability."""
    own = logits[:, token: token + 1]
    ranks = (logits > own).sum(-1) + 1
    probs = logits.log_softmax(-1)[:, token].exp()
    return [int(r) for r in ranks], [float(f"{float(p):.{PROB_DIGITS}g}") for p in probs]


def subject_attention(lens: PromptLens, span: tuple[int, int] | None) -> list[list[float]] | None:
    """[layer][head]: attention from the last position summed over the subject's tokens."""
    if span is None or any(a is None for a in lens.attention):
        return None
    start, end = span
    return [[round(float(v), ATTENTION_DECIMALS) for v in a[:, start:end].sum(-1)] for a in lens.attention]


def case_lens(model: nn.Module, arch: ArchSpec, tokenizer, prompt: str, subject: str, target_true: str,
              target_new: str) -> dict[str, Any]:
    """The compact per-case record: ranks and probabilities of both targets' first tokens at every layer,
    and every head's attention to the subject."""
    ids = prompt_ids(tokenizer, prompt)
    lens = read_prompt(model, arch, ids)
    logits = unembed(model, arch, lens.residual)
    out: dict[str, Any] = {}
    for key, target in (("new", target_new), ("true", target_true)):
        out[f"{key}_rank"], out[f"{key}_prob"] = rank_and_prob(logits, target_ids(tokenizer, target)[0])
    try:
        span: tuple[int, int] | None = subject_token_range(tokenizer, prompt, subject, last=True)
    except ValueError:
        span = None
    out["subject_attention"] = subject_attention(lens, span)
    return out


# --- averages over a run's cases ---------------------------------------------------------------

TOP_K = 10
N_MOVER_HEADS = 5


def first_layer_in_top(ranks: list[float], k: int = TOP_K) -> int | None:
    """The first layer (0-based) whose rank is at most k, or None."""
    return next((layer for layer, rank in enumerate(ranks) if rank <= k), None)


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def _per_layer(rows: list[dict[str, Any]], key: str, reduce: str) -> list[float]:
    table = torch.tensor([row[key] for row in rows], dtype=torch.float64)  # [cases, L]
    return (table.median(0).values if reduce == "median" else table.mean(0)).tolist()


def lens_summary(cases: list[dict[str, Any]], k: int = TOP_K, n_heads: int = N_MOVER_HEADS
                 ) -> dict[str, Any] | None:
    """Per layer over a run's finished cases with both lenses: the median rank and mean probability of
    target_new and target_true before and after the edit; the first layer where target_new is in the top k
    (of the median-rank curve, and per case: the median over cases and the share of cases that get there);
    and the attention to the subject of the run's top-n heads by pre-edit subject attention (the attention
    criterion of mover heads), before and after."""
    rows = [c for c in cases if c.get("status") == "ok" and isinstance(c.get("lens_pre"), dict)
            and isinstance(c.get("lens_post"), dict)]
    if not rows:
        return None
    lengths = {len(c["lens_pre"]["new_rank"]) for c in rows} | {len(c["lens_post"]["new_rank"]) for c in rows}
    if len(lengths) != 1:
        return None
    out: dict[str, Any] = {"n_cases": len(rows), "n_layers": lengths.pop(), "top_k": k}
    for phase in ("pre", "post"):
        lenses = [c[f"lens_{phase}"] for c in rows]
        for target in ("new", "true"):
            out[f"{phase}_{target}_rank_median"] = _per_layer(lenses, f"{target}_rank", "median")
            out[f"{phase}_{target}_prob_mean"] = _per_layer(lenses, f"{target}_prob", "mean")
        curve = first_layer_in_top(out[f"{phase}_new_rank_median"], k)
        per_case = [first_layer_in_top(lens["new_rank"], k) for lens in lenses]
        reached = [layer for layer in per_case if layer is not None]
        out[f"{phase}_new_first_top_layer"] = curve
        out[f"{phase}_new_first_top_layer_case_median"] = _median(reached) if reached else None
        out[f"{phase}_new_reaches_top_share"] = len(reached) / len(per_case)
    out.update(mover_attention(rows, n_heads))
    return out


def mover_attention(rows: list[dict[str, Any]], n_heads: int) -> dict[str, Any]:
    """The n heads with the highest mean pre-edit attention to the subject, and their mean attention to the
    subject before and after the edit."""
    pairs = [(c["lens_pre"].get("subject_attention"), c["lens_post"].get("subject_attention")) for c in rows]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return {}
    pre = torch.tensor([a for a, _ in pairs], dtype=torch.float64).mean(0)  # [L, H]
    post = torch.tensor([b for _, b in pairs], dtype=torch.float64).mean(0)
    top = pre.flatten().topk(min(n_heads, pre.numel())).indices
    heads = [(int(i) // pre.shape[1], int(i) % pre.shape[1]) for i in top]
    return {"mover_heads": [f"L{layer}H{head}" for layer, head in heads],
            "mover_attention_pre": [float(pre[layer, head]) for layer, head in heads],
            "mover_attention_post": [float(post[layer, head]) for layer, head in heads],
            "subject_attention_n_cases": len(pairs)}
