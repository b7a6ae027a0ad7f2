"""The per-layer view of a relation: where the answer emerges, and which components carry it.

* Logit lens (nostalgebraist 2020; Yao et al. 2024, the "where does the target emerge" figure): the
  residual stream at the last prompt position, after each layer's attention (`resid_mid`) and after its
  MLP (`resid_post`), is read through the final norm and the unembedding. We report the rank (1 = top)
  and the probability of the answer's first token, the median rank and the mean probability over prompts.
  At the last layer's `resid_post` this is exactly the model's own output.
* Mover heads (Yao et al. 2024, Sec. 4): heads whose attention from the last position goes to the
  subject's tokens (the share of attention on them, averaged over prompts).
* Relation heads: heads whose attention from the last position goes to the relation's tokens, taken as
  every token of the query that is neither the subject, a special token (empty character span, e.g.
  BOS), nor the last position itself. With few-shot prompts only the query's tokens count: the
  demonstrations before it are neither subject nor relation.
  A BOS token (a special token, so neither role) is where most heads park their attention (an attention
  sink). Models without BOS (GPT-2) park it on the first real token, which then counts by its role; on
  such models a zero-shot template that starts with the subject inflates every head's mover share, and
  `--shots 1` or more moves the query off position 0.
* MLPs where the answer's rank jumps: the mean over prompts of log10(rank before the MLP) -
  log10(rank after it), largest first.

Differences from the paper: the paper reads heads off its discovered circuit by hand; here heads are
ranked by attention share over all heads, and each is flagged with whether it is in the circuit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lmview.tokens import target_ids


@dataclass
class LensInputs:
    """Right-padded prompts with the positions of their subject and relation tokens."""

    ids: torch.Tensor  # [B, P]
    mask: torch.Tensor  # [B, P]
    last: torch.Tensor  # [B] last real position
    answers: torch.Tensor  # [B] answer's first token
    subject_pos: torch.Tensor  # [B, P] bool
    relation_pos: torch.Tensor  # [B, P] bool


def token_roles(tokenizer, prompt: str, subject: str, context: str = "") -> tuple[list[int], list[bool], list[bool]]:
    """Prompt ids, and per token whether it is part of the subject / of the relation (see module doc);
    `context` is the demonstrations the prompt starts with, whose tokens have neither role."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.rfind(subject)
    if start < len(context):
        raise ValueError(f"subject {subject!r} is not in the query of prompt {prompt!r}")
    end = start + len(subject)
    is_subject, is_relation = [], []
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        overlaps = a < end and b > start
        content = b > a and a >= len(context)  # a real token of the query (special tokens have no span)
        is_subject.append(content and overlaps)
        is_relation.append(content and not overlaps and i < len(enc.input_ids) - 1)
    return list(enc.input_ids), is_subject, is_relation


def lens_inputs(tokenizer, prompts: list[str], subjects: list[str], answers: list[str],
                device: torch.device, contexts: list[str] | None = None) -> LensInputs:
    contexts = contexts or [""] * len(prompts)
    rows = [token_roles(tokenizer, p, s, c) for p, s, c in zip(prompts, subjects, contexts, strict=True)]
    width = max(len(ids) for ids, _, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    subj = torch.zeros((len(rows), width), dtype=torch.bool)
    rel = torch.zeros_like(subj)
    for i, (row, s, r) in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        subj[i, : len(row)], rel[i, : len(row)] = torch.tensor(s), torch.tensor(r)
    answer_ids = torch.tensor([target_ids(tokenizer, a)[0] for a in answers])
    return LensInputs(ids.to(device), mask.to(device), (mask.sum(1) - 1).to(device), answer_ids.to(device),
                      subj.to(device), rel.to(device))


def _recorder(store: dict[str, torch.Tensor], key: str, last: torch.Tensor) -> Callable:
    """Keeps a hook's activation at each row's last real position only."""
    rows = torch.arange(last.shape[0], device=last.device)

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if key.startswith("pattern"):
            store[key] = act.detach()[rows, :, last].float()  # [B, H, K]
        else:
            store[key] = act.detach()[rows, last]  # [B, D]
        return act

    return fn


def answer_rank_and_prob(logits: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (1 = top) and probability of each row's answer token in logits [B, V]."""
    logits = logits.float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    target = logits[rows, answers]
    rank = (logits > target[:, None]).sum(-1) + 1
    return rank, logits.softmax(-1)[rows, answers]


@torch.no_grad()
def collect(bundle, inputs: LensInputs) -> dict[str, torch.Tensor]:
    """One hooked forward: residual streams and attention patterns at the last position."""
    store: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in range(bundle.arch.n_layers):
        hooks.append((f"blocks.{layer}.hook_resid_mid", _recorder(store, f"mid{layer}", inputs.last)))
        hooks.append((f"blocks.{layer}.hook_resid_post", _recorder(store, f"post{layer}", inputs.last)))
        hooks.append((f"blocks.{layer}.attn.hook_pattern", _recorder(store, f"pattern{layer}", inputs.last)))
    bundle.bridge().run_with_hooks(inputs.ids, fwd_hooks=hooks, attention_mask=inputs.mask)
    return store


@torch.no_grad()
def logit_lens(bundle, resid: torch.Tensor) -> torch.Tensor:
    """Final norm then unembedding of residual vectors [B, D] -> logits [B, V]."""
    norm = bundle.arch.ln_final(bundle.model)
    return bundle.model.get_output_embeddings()(norm(resid))


def _stats(rank: torch.Tensor, prob: torch.Tensor) -> dict[str, float]:
    return {"rank_median": float(rank.float().median()), "rank_mean": float(rank.float().mean()),
            "prob_mean": float(prob.mean()), "hit_at_10": float((rank <= 10).float().mean())}


def layer_view(bundle, prompts: list[str], subjects: list[str], answers: list[str],
               circuit_nodes: set[str] | None = None, top: int = 5, contexts: list[str] | None = None) -> dict[str, Any]:
    """Logit lens per layer, and the top mover heads, relation heads and rank-jump MLPs (contexts: the
    few-shot demonstrations before each prompt's query)."""
    inputs = lens_inputs(bundle.tokenizer, prompts, subjects, answers, bundle.device, contexts)
    store = collect(bundle, inputs)
    n_layers, nodes = bundle.arch.n_layers, circuit_nodes or set()
    layers, jumps = [], []
    subject_share, relation_share = [], []
    for layer in range(n_layers):
        rank_mid, prob_mid = answer_rank_and_prob(logit_lens(bundle, store[f"mid{layer}"]), inputs.answers)
        rank_post, prob_post = answer_rank_and_prob(logit_lens(bundle, store[f"post{layer}"]), inputs.answers)
        layers.append({"layer": layer, "after_attention": _stats(rank_mid, prob_mid),
                       "after_mlp": _stats(rank_post, prob_post)})
        jumps.append(float((rank_mid.float().log10() - rank_post.float().log10()).mean()))
        pattern = store[f"pattern{layer}"]  # [B, H, K]
        subject_share.append((pattern * inputs.subject_pos[:, None, :]).sum(-1).mean(0))
        relation_share.append((pattern * inputs.relation_pos[:, None, :]).sum(-1).mean(0))
    subject_map, relation_map = torch.stack(subject_share), torch.stack(relation_share)  # [L, H]
    return {
        "n_prompts": len(prompts),
        "logit_lens": layers,
        "subject_attention": subject_map.tolist(),
        "relation_attention": relation_map.tolist(),
        "mlp_rank_jump": jumps,
        "mover_heads": _top_heads(subject_map, nodes, top),
        "relation_heads": _top_heads(relation_map, nodes, top),
        "rank_jump_mlps": [{"node": f"m{layer}", "log10_rank_drop": jumps[layer], "in_circuit": f"m{layer}" in nodes}
                           for layer in sorted(range(n_layers), key=lambda l: -jumps[l])[:top] if jumps[layer] > 0],
    }


def _top_heads(share: torch.Tensor, nodes: set[str], top: int) -> list[dict[str, Any]]:
    flat = share.flatten()
    order = flat.argsort(descending=True)[:top].tolist()
    n_heads = share.shape[1]
    return [{"node": f"a{i // n_heads}.h{i % n_heads}", "attention": float(flat[i]),
             "in_circuit": f"a{i // n_heads}.h{i % n_heads}" in nodes} for i in order]


def plot_layers(view: dict[str, Any], path: Path, title: str = "") -> None:
    """layers.png: answer rank and probability per layer, and the attention maps to subject / relation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lens = view["logit_lens"]
    x = [row["layer"] for row in lens]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for where, style in (("after_attention", "--"), ("after_mlp", "-")):
        ax.plot(x, [row[where]["rank_median"] for row in lens], style, marker=".", label=f"{where.replace('_', ' ')}")
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.set(xlabel="layer", ylabel="median rank of the answer (log)", title="logit lens: rank")
    for item in view["rank_jump_mlps"][:3]:
        ax.axvline(int(item["node"][1:]), color="grey", alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    for where, style in (("after_attention", "--"), ("after_mlp", "-")):
        ax.plot(x, [row[where]["prob_mean"] for row in lens], style, marker=".", label=where.replace("_", " "))
    ax.set(xlabel="layer", ylabel="mean probability of the answer", title="logit lens: probability")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    for ax, key, name in ((axes[1][0], "subject_attention", "mover heads: last position -> subject"),
                          (axes[1][1], "relation_attention", "relation heads: last position -> relation")):
        image = ax.imshow(torch.tensor(view[key]).T.numpy(), aspect="auto", origin="lower", cmap="viridis")
        ax.set(xlabel="layer", ylabel="head", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="attention share")
    fig.suptitle(title or f"per-layer view ({view['n_prompts']} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
