"""In-context learning circuits (Knowledge Circuits §5.2): one fact without and with demonstrations.

For each fact: the zero-shot prompt (KC's template) and the same query after k demonstrations of the
relation (LRE's layout, as `bench circuit --shots k` and IKE build it: `template(subject_i) object_i`
lines, none about the query's subject or with its answer). Both circuits are found for the answer on a
corrupted prompt that swaps the query's subject (EAP, corrupted patching, log-prob, top-n edges; with
demonstrations only the query's positions are ablated, the demonstrations run clean). Reported: the
answer's rank with and without demonstrations, the circuits' Jaccard, and the heads that appear only
with demonstrations, with their attention from the last position to the demonstration tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.heads import read_heads
from lmview.tokens import prompt_ids, target_ids


def is_head(node: str) -> bool:
    return node.startswith("a") and ".h" in node


def head_index(node: str) -> tuple[int, int]:
    layer, head = node[1:].split(".h")
    return int(layer), int(head.split("<")[0])


def context_attention(bundle, ids: list[int], query_start: int) -> torch.Tensor:
    """[L, H]: attention from the last position to the demonstration tokens (positions before the query)."""
    return read_heads(bundle, ids).attention[:, :, :query_start].sum(-1)


def incontext_fact(bundle, zero, few, samples, top_n: int) -> dict[str, Any]:
    """zero, few: bench.relation_circuits.Fact of the same query without and with demonstrations."""
    from bench.analyses import corrupting_prompt, node_difference, prompt_circuit
    from bench.relation_circuits import answer_ranks, query_start

    tok = bundle.tokenizer
    answer = target_ids(tok, zero.object)[0]
    rank_zero, rank_few = answer_ranks(bundle.model, tok, [zero, few], bundle.device)
    row: dict[str, Any] = {"subject": zero.subject, "answer": zero.object, "prompt_zero_shot": zero.prompt,
                           "prompt_few_shot": few.prompt, "rank_zero_shot": rank_zero, "rank_few_shot": rank_few}
    partner_zero = corrupting_prompt(tok, zero.prompt, zero.subject, samples, {answer})
    partner_few = corrupting_prompt(tok, few.prompt, few.subject, samples, {answer})
    if partner_zero is None or partner_few is None:
        row["note"] = "no corrupting subject of the same token length"
        return row
    start = query_start(tok, few)
    few_ids = prompt_ids(tok, few.prompt)
    c_zero = prompt_circuit(bundle, prompt_ids(tok, zero.prompt), partner_zero[0], answer, zero.object, top_n)
    c_few = prompt_circuit(bundle, few_ids, partner_few[0], answer, few.object, top_n, ablate_from=start)
    diff = node_difference(c_zero, c_few)
    attention = context_attention(bundle, few_ids, start)
    new_heads = sorted({head_index(n) for n in diff["only_second"] if is_head(n)})
    row.update(edge_jaccard=diff["edge_jaccard"], node_jaccard=diff["node_jaccard"],
               new_heads=[{"head": f"L{l}H{h}", "context_attention": round(float(attention[l, h]), 4)}
                          for l, h in new_heads],
               gone_heads=[f"L{l}H{h}" for l, h in sorted({head_index(n) for n in diff["only_first"] if is_head(n)})],
               mean_context_attention_all_heads=round(float(attention.mean()), 4))
    return row


def incontext_summary(rows: list[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    done = [r for r in rows if "edge_jaccard" in r]
    counts: dict[str, list[float]] = {}
    for row in done:
        for head in row["new_heads"]:
            counts.setdefault(head["head"], []).append(head["context_attention"])
    frequent = sorted(counts.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    layers = [0] * n_layers
    for name, values in counts.items():
        layers[int(name[1:].split("H")[0])] += len(values)
    n = len(done)
    return {"n_facts": len(rows), "n_with_circuits": n,
            "mean_edge_jaccard": sum(r["edge_jaccard"] for r in done) / n if n else None,
            "mean_node_jaccard": sum(r["node_jaccard"] for r in done) / n if n else None,
            "share_top1_zero_shot": sum(r["rank_zero_shot"] == 1 for r in rows) / len(rows),
            "share_top1_few_shot": sum(r["rank_few_shot"] == 1 for r in rows) / len(rows),
            "new_heads_most_often": [{"head": h, "n_facts": len(v), "mean_context_attention": sum(v) / len(v)}
                                     for h, v in frequent[:15]],
            "new_heads_by_layer": layers,
            "mean_context_attention_new_heads": (sum(sum(v) for v in counts.values()) /
                                                 sum(len(v) for v in counts.values())) if counts else None,
            "mean_context_attention_all_heads": (sum(r["mean_context_attention_all_heads"] for r in done) / n
                                                 if n else None)}
