"""Special attention heads (Knowledge Circuits §4.2): mover, relation and mixture heads.

For one prompt, at its last position (END), head (l, h)'s output decomposes over source positions s:
    out_h = Σ_s A_h[END, s] · v_s W_O[h]
(v_s: the value vector of s for h's key/value group). Each source's part is read through the model's
unembedding with the final norm's scale frozen at END (TransformerLens's `apply_ln=True`, as KC's
`get_heads_out`), against the centred unembedding (KC loads its models with `center_unembed=True`), which
gives its direct logit attribution (DLA) to the answer's first token. Per head and prompt:

- attention_subject / attention_relation: Σ_s A_h[END, s] over the subject's tokens / over the other
  tokens of the prompt (the relation's words and END itself; a BOS token is neither, as KC drops position 0);
- dla_subject / dla_relation: the DLA of the parts sourced at the subject / relation tokens (Chughtai et
  al. 2024's source-decomposed DLA; KC's notebooks read the same split);
- copies_subject: whether one of the subject's tokens is in the top 10 of the head's whole output read
  through the unembedding (what the head writes: KC's `get_heads_out` + `draw_output_pattern_with_text`);
- answer_rank: the answer's rank in that readout.

A relation's heads are classified on the means over its facts (rules in `classify`). KC classifies heads
by reading their attention patterns and output tokens by hand inside the circuit; the thresholds here are
ours and are stated in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bench.tracing import subject_token_range
from lmview.tokens import prompt_ids, target_ids

CLASSES = ("mover", "relation", "mixture")
TOP_TOKENS = 10


@dataclass
class HeadRules:
    """Thresholds of the classification (means over a relation's facts)."""

    min_attention: float = 0.3  # attention share at END to the subject (mover) or relation tokens (relation)
    min_dla_fraction: float = 0.1  # a source's DLA counts when ≥ this × the largest head DLA of the relation
    min_copy_share: float = 0.5  # mover without answer DLA: copies a subject token in ≥ this share of facts

    def describe(self) -> dict[str, str]:
        t, f, c = self.min_attention, self.min_dla_fraction, self.min_copy_share
        return {"significant DLA": f"a source's DLA to the answer ≥ {f:g} × the relation's largest head DLA "
                                   f"(dla_subject + dla_relation)",
                "mixture": f"attention to the subject ≥ {t / 2:g} and to the relation ≥ {t / 2:g}, and both "
                           f"sources' DLA significant",
                "mover": f"not mixture; attention to the subject ≥ {t:g}; and its subject-sourced DLA "
                         f"significant or a subject token in its top {TOP_TOKENS} output tokens in ≥ {c:g} of "
                         f"the facts",
                "relation": f"not mixture; attention to the relation tokens ≥ {t:g}; relation-sourced DLA "
                            f"significant and subject-sourced DLA not"}


@dataclass
class FactHeads:
    """One prompt's per-head numbers, each [n_layers, n_heads]."""

    attention_subject: torch.Tensor
    attention_relation: torch.Tensor
    dla_subject: torch.Tensor
    dla_relation: torch.Tensor
    copies_subject: torch.Tensor  # bool
    answer_rank: torch.Tensor
    head_output: torch.Tensor = field(repr=False)  # [L, H, d_model], after the frozen final norm


HOOKS = ("attn.hook_pattern", "attn.hook_v")


def frozen_final_norm(bundle, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The final norm's linear map with the END position's scale: RMSNorm x·w/scale; LayerNorm
    (x − mean x)·w/scale (biases belong to no component)."""
    norm = bundle.arch.ln_final(bundle.model)
    if bundle.arch.family == "gpt2":
        x = x - x.mean(-1, keepdim=True)
    return x * norm.weight.float() / scale


def centred_unembedding(bundle) -> torch.Tensor:
    """W_U as [vocab, d_model] with its mean over the vocabulary removed (TransformerLens center_unembed)."""
    w = bundle.model.get_output_embeddings().weight.float()
    return w - w.mean(0, keepdim=True)


def relation_positions(tokenizer, ids: list[int], span: tuple[int, int]) -> list[int]:
    special = set(tokenizer.all_special_ids or [])
    return [i for i in range(len(ids)) if not span[0] <= i < span[1] and not (i == 0 and ids[0] in special)]


@dataclass
class Readout:
    """One forward pass at END: attention rows [L, H, T], per layer each head's output split by source
    position [H, T, d_model], and the final norm's scale at END."""

    attention: torch.Tensor
    per_source: list[torch.Tensor]
    scale: torch.Tensor
    mlp_out: torch.Tensor | None = None  # [L, d_model] each MLP's output at END (with mlp=True)


@torch.no_grad()
def read_heads(bundle, ids: list[int], mlp: bool = False) -> Readout:
    """One forward pass of the TransformerLens bridge with the attention patterns and values cached (and
    with mlp, each MLP's output)."""
    arch = bundle.arch
    hooks = HOOKS + (("hook_mlp_out",) if mlp else ())
    names = {f"blocks.{l}.{hook}" for l in range(arch.n_layers) for hook in hooks} | {"ln_final.hook_scale"}
    tokens = torch.tensor([ids], device=bundle.device)
    _, cache = bundle.bridge().run_with_cache(tokens, names_filter=lambda name: name in names)
    rows, outputs = [], []
    for layer in range(arch.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1, :].float()  # [H, T]
        values = cache[f"blocks.{layer}.attn.hook_v"][0].float().repeat_interleave(arch.heads_per_kv, dim=1)
        w_o = arch.o_weight(bundle.model, layer).float()  # [H, d_head, d_model]
        rows.append(pattern)
        outputs.append(torch.einsum("ht,thd,hdm->htm", pattern, values, w_o))
    mlp_out = (torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0, -1].float() for l in range(arch.n_layers)])
               if mlp else None)
    return Readout(torch.stack(rows), outputs, cache["ln_final.hook_scale"][0, -1].float(), mlp_out)


@torch.no_grad()
def fact_heads(bundle, prompt: str, subject: str, answer: str, unembed: torch.Tensor | None = None) -> FactHeads:
    """The per-head numbers of one prompt (module docstring)."""
    tok = bundle.tokenizer
    ids = prompt_ids(tok, prompt)
    span = subject_token_range(tok, prompt, subject, last=True)
    relation = relation_positions(tok, ids, span)
    unembed = centred_unembedding(bundle) if unembed is None else unembed
    answer_id = target_ids(tok, answer)[0]
    subject_ids = torch.tensor(sorted(set(ids[span[0]:span[1]])), device=unembed.device)
    readout = read_heads(bundle, ids)
    dla_s, dla_r, copies, ranks, outs = [], [], [], [], []
    for parts in readout.per_source:
        normed = frozen_final_norm(bundle, parts, readout.scale)  # [H, T, d]
        dla = normed @ unembed[answer_id]  # [H, T]
        whole = normed.sum(1)  # [H, d]: the head's output at END
        logits = whole @ unembed.T  # [H, V]
        dla_s.append(dla[:, span[0]:span[1]].sum(-1))
        dla_r.append(dla[:, relation].sum(-1))
        copies.append(torch.isin(logits.topk(TOP_TOKENS, dim=-1).indices, subject_ids).any(-1))
        ranks.append((logits > logits[:, answer_id: answer_id + 1]).sum(-1) + 1)
        outs.append(whole)
    attention = readout.attention
    return FactHeads(attention_subject=attention[:, :, span[0]:span[1]].sum(-1),
                     attention_relation=attention[:, :, relation].sum(-1),
                     dla_subject=torch.stack(dla_s), dla_relation=torch.stack(dla_r),
                     copies_subject=torch.stack(copies), answer_rank=torch.stack(ranks), head_output=torch.stack(outs))


# --- a relation's heads ------------------------------------------------------------------------------

MEAN_FIELDS = ("attention_subject", "attention_relation", "dla_subject", "dla_relation", "copies_subject")


def mean_over_facts(facts: list[FactHeads]) -> dict[str, torch.Tensor]:
    """[L, H] means over the facts (copies_subject: the share of facts), the answer's median rank and the mean
    head output."""
    means = {name: torch.stack([getattr(f, name).float() for f in facts]).mean(0) for name in MEAN_FIELDS}
    means["answer_rank"] = torch.stack([f.answer_rank.float() for f in facts]).median(0).values
    means["head_output"] = torch.stack([f.head_output for f in facts]).mean(0)
    return means


def classify(means: dict[str, torch.Tensor], rules: HeadRules) -> dict[str, list[tuple[int, int]]]:
    """Heads per class, each list by decreasing total DLA (rules: HeadRules.describe)."""
    a_s, a_r = means["attention_subject"], means["attention_relation"]
    d_s, d_r = means["dla_subject"], means["dla_relation"]
    largest = float((d_s + d_r).max())
    floor = rules.min_dla_fraction * largest if largest > 0 else float("inf")
    sig_s, sig_r = d_s >= floor, d_r >= floor
    half = rules.min_attention / 2
    mixture = (a_s >= half) & (a_r >= half) & sig_s & sig_r
    mover = ~mixture & (a_s >= rules.min_attention) & (sig_s | (means["copies_subject"] >= rules.min_copy_share))
    relation = ~mixture & ~mover & (a_r >= rules.min_attention) & sig_r & ~sig_s
    total = d_s + d_r
    out = {}
    for name, mask in (("mover", mover), ("relation", relation), ("mixture", mixture)):
        heads = [(int(l), int(h)) for l, h in mask.nonzero().tolist()]
        out[name] = sorted(heads, key=lambda lh: -float(total[lh]))
    return out


def head_entry(bundle, means: dict[str, torch.Tensor], layer: int, head: int, unembed: torch.Tensor,
               n_tokens: int = 5) -> dict[str, Any]:
    logits = means["head_output"][layer, head] @ unembed.T
    top = [bundle.tokenizer.decode([i]) for i in logits.topk(n_tokens).indices.tolist()]
    entry: dict[str, Any] = {"head": f"L{layer}H{head}", "layer": layer}
    for name in MEAN_FIELDS + ("answer_rank",):
        entry[name] = round(float(means[name][layer, head]), 4)
    entry["top_tokens_mean_output"] = top
    return entry


def layer_distribution(classes: dict[str, list[tuple[int, int]]], n_layers: int) -> dict[str, list[int]]:
    return {name: [sum(l == layer for l, _ in heads) for layer in range(n_layers)] for name, heads in classes.items()}


def relation_report(bundle, facts: list[tuple[str, str, str]], rules: HeadRules) -> dict[str, Any]:
    """facts: (prompt, subject, answer). The classified heads with their numbers, the layer distribution
    and the per-head means (for the figures)."""
    unembed = centred_unembedding(bundle)
    per_fact = [fact_heads(bundle, p, s, a, unembed) for p, s, a in facts]
    means = mean_over_facts(per_fact)
    classes = classify(means, rules)
    return {"n_facts": len(facts),
            "facts": [{"prompt": p, "subject": s, "answer": a} for p, s, a in facts],
            "heads": {name: [head_entry(bundle, means, l, h, unembed) for l, h in heads]
                      for name, heads in classes.items()},
            "layer_distribution": layer_distribution(classes, bundle.arch.n_layers),
            "per_head": {name: [[round(float(v), 4) for v in row] for row in means[name]]
                         for name in MEAN_FIELDS}}
