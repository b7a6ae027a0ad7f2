"""Hallucination circuits (Knowledge Circuits §5.1): facts the model gets wrong, and where the right
answer is lost.

A fact is a *hallucination* here when the model's top-1 next token after the prompt is not the first
token of the relation's object but is the first token of another object of the same relation (a wrong
entity of the right type, e.g. a capital of another country); `any_wrong` also admits any other top-1
token. For each such fact:

- the logit lens (circuits/layers.py) at the last position after every layer's attention and after its
  MLP gives the rank of the right answer and of the model's wrong answer through the model;
  - `peak`: the component where the right answer ranks best;
  - `lost_at`: after the peak, the component whose output raises the right answer's log10 rank most
    (pushes it down the list), None when its rank never rises after the peak;
  - `overtaken_at`: the component after which the wrong answer stays ahead of the right one;
- direct logit attribution to logit(wrong) − logit(right) of every head and MLP at the last position
  (final norm's scale frozen, as bench/heads.py): the components that push toward the wrong answer;
- optionally the circuit of the wrong answer and the circuit of the right one on the same corrupted
  prompt (EAP, corrupted patching, log-prob metric, top-n edges): their Jaccard and the nodes only in
  the wrong answer's circuit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bench.heads import centred_unembedding, frozen_final_norm, read_heads
from lmview.tokens import prompt_ids, target_ids


@dataclass
class WrongFact:
    relation: str
    prompt: str
    subject: str
    answer: str
    wrong_id: int
    wrong: str
    samples: tuple[tuple[str, str], ...] = ()


def component_names(n_layers: int) -> list[str]:
    """The 2L points of the lens, in order: after layer l's attention ("a<l>") and after its MLP ("m<l>")."""
    return [name for layer in range(n_layers) for name in (f"a{layer}", f"m{layer}")]


def lens_ranks(bundle, facts: list[WrongFact]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks [B, 2L] of the right and of the wrong answer after each attention and each MLP."""
    from circuits.layers import answer_rank_and_prob, collect, lens_inputs, logit_lens

    inputs = lens_inputs(bundle.tokenizer, [f.prompt for f in facts], [f.subject for f in facts],
                         [f.answer for f in facts], bundle.device)
    store = collect(bundle, inputs)
    wrong = torch.tensor([f.wrong_id for f in facts], device=bundle.device)
    right_ranks, wrong_ranks = [], []
    for layer in range(bundle.arch.n_layers):
        for key in (f"mid{layer}", f"post{layer}"):
            logits = logit_lens(bundle, store[key])
            right_ranks.append(answer_rank_and_prob(logits, inputs.answers)[0])
            wrong_ranks.append(answer_rank_and_prob(logits, wrong)[0])
    return torch.stack(right_ranks, 1), torch.stack(wrong_ranks, 1)


def where_lost(right: list[int], wrong: list[int]) -> dict[str, int | None]:
    """peak, lost_at and overtaken_at (indices into the 2L lens points; module docstring)."""
    logs = [math.log10(r) for r in right]
    peak = min(range(len(right)), key=lambda i: (right[i], i))
    rises = [(logs[i] - logs[i - 1], i) for i in range(peak + 1, len(right))]
    lost = max(rises)[1] if rises and max(rises)[0] > 0 else None
    ahead = [w < r for w, r in zip(wrong, right)]
    overtaken = None
    if ahead and ahead[-1]:
        overtaken = len(ahead) - 1
        while overtaken > 0 and ahead[overtaken - 1]:
            overtaken -= 1
    return {"peak": peak, "lost_at": lost, "overtaken_at": overtaken}


@torch.no_grad()
def wrong_vs_right_dla(bundle, fact: WrongFact, unembed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DLA to logit(wrong) − logit(right) at END: per head [L, H] and per MLP [L]."""
    readout = read_heads(bundle, prompt_ids(bundle.tokenizer, fact.prompt), mlp=True)
    direction = unembed[fact.wrong_id] - unembed[target_ids(bundle.tokenizer, fact.answer)[0]]
    heads = torch.stack([frozen_final_norm(bundle, parts.sum(1), readout.scale) @ direction
                         for parts in readout.per_source])
    mlps = frozen_final_norm(bundle, readout.mlp_out, readout.scale) @ direction
    return heads, mlps


def fact_circuits(bundle, fact: WrongFact, top_n: int) -> dict[str, Any]:
    """The circuits of the right and of the wrong answer on one corrupted prompt, and their difference."""
    from bench.analyses import corrupting_prompt, node_difference, prompt_circuit

    tok = bundle.tokenizer
    right_id = target_ids(tok, fact.answer)[0]
    partner = corrupting_prompt(tok, fact.prompt, fact.subject, fact.samples, {right_id, fact.wrong_id})
    if partner is None:
        return {"note": "no corrupting subject of the same token length whose answer differs from both"}
    clean = prompt_ids(tok, fact.prompt)
    right = prompt_circuit(bundle, clean, partner[0], right_id, fact.answer, top_n)
    wrong = prompt_circuit(bundle, clean, partner[0], fact.wrong_id, fact.wrong, top_n)
    diff = node_difference(right, wrong)
    return {"edge_jaccard": diff["edge_jaccard"], "node_jaccard": diff["node_jaccard"],
            "nodes_only_right": diff["only_first"], "nodes_only_wrong": diff["only_second"]}


def hallucination_report(bundle, facts: list[WrongFact], top_n: int | None, n_components: int = 5) -> dict[str, Any]:
    names = component_names(bundle.arch.n_layers)
    right_ranks, wrong_ranks = lens_ranks(bundle, facts)
    unembed = centred_unembedding(bundle)
    rows, head_sum, mlp_sum = [], None, None
    for index, fact in enumerate(facts):
        right, wrong = right_ranks[index].tolist(), wrong_ranks[index].tolist()
        spots = where_lost(right, wrong)
        heads, mlps = wrong_vs_right_dla(bundle, fact, unembed)
        head_sum = heads if head_sum is None else head_sum + heads
        mlp_sum = mlps if mlp_sum is None else mlp_sum + mlps
        row = {"relation": fact.relation, "prompt": fact.prompt, "subject": fact.subject, "answer": fact.answer,
               "wrong": fact.wrong, "right_rank": right, "wrong_rank": wrong,
               **{k: (names[v] if v is not None else None) for k, v in spots.items()},
               "right_best_rank": min(right), "right_final_rank": right[-1],
               "toward_wrong": top_components(heads, mlps, n_components)}
        if top_n:
            row["circuits"] = fact_circuits(bundle, fact, top_n)
        rows.append(row)
    n = len(facts)
    logs_right = right_ranks.float().log10()
    report: dict[str, Any] = {
        "n_facts": n, "components": names, "facts": rows,
        "mean_log10_rank_right": logs_right.mean(0).tolist(),
        "mean_log10_rank_wrong": wrong_ranks.float().log10().mean(0).tolist(),
        "lost_at_counts": {c: sum(r["lost_at"] == c for r in rows) for c in names},
        "peak_counts": {c: sum(r["peak"] == c for r in rows) for c in names},
        "mean_dla_wrong_minus_right_heads": (head_sum / n).tolist(),
        "mean_dla_wrong_minus_right_mlps": (mlp_sum / n).tolist(),
        "toward_wrong_mean": top_components(head_sum / n, mlp_sum / n, 10),
        "share_right_in_top10_somewhere": sum(r["right_best_rank"] <= 10 for r in rows) / n,
    }
    with_circuits = [r["circuits"] for r in rows if "edge_jaccard" in r.get("circuits", {})]
    if with_circuits:
        only_wrong: dict[str, int] = {}
        for c in with_circuits:
            for node in c["nodes_only_wrong"]:
                only_wrong[node] = only_wrong.get(node, 0) + 1
        report["circuits"] = {
            "n_facts": len(with_circuits), "top_n": top_n,
            "mean_edge_jaccard": sum(c["edge_jaccard"] for c in with_circuits) / len(with_circuits),
            "mean_node_jaccard": sum(c["node_jaccard"] for c in with_circuits) / len(with_circuits),
            "nodes_most_often_only_in_wrong": sorted(only_wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:15]}
    return report


def top_components(heads: torch.Tensor, mlps: torch.Tensor, k: int) -> list[list[Any]]:
    """The k components with the largest DLA toward the wrong answer: [name, value]."""
    items = [(f"a{l}.h{h}", float(heads[l, h])) for l in range(heads.shape[0]) for h in range(heads.shape[1])]
    items += [(f"m{l}", float(v)) for l, v in enumerate(mlps.tolist())]
    return [[name, round(value, 4)] for name, value in sorted(items, key=lambda x: -x[1])[:k]]
