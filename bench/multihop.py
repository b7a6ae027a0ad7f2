"""Multi-hop circuits (Knowledge Circuits §5: "the circuit of a two-hop question, and whether the first
hop's circuit is reused").

Two-hop chains are built from the LRE relations (no MQuAKE file is bundled): a first relation r1 whose
object is a subject of a second relation r2 gives (s, o1, o2) with r1(s) = o1 and r2(o1) = o2. The
two-hop question joins them in one sentence from the template table CHAINS (our wording, e.g. "The
capital city of the country where {} is located is" for landmark_in_country then country_capital_city).
The single hops use each relation's KC template (its first zero-shot template).

For each chain whose two single hops the model answers: the circuits (EAP, corrupted patching, log-prob,
top-n edges; the corrupting prompt swaps s, or o1 for the second hop) of
  - the two-hop question (answer o2), - the first hop (s → o1), - the second hop (o1 → o2);
their node Jaccards, and the share of each single hop's nodes (heads and MLPs) that the two-hop circuit
contains; and the logit lens of the two-hop question at its last position: the ranks of the bridge
entity o1 and of the answer o2 after every layer (KC plots the bridge entity the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bench.lens import rank_and_prob, read_prompt, unembed
from lmview.tokens import prompt_ids, target_ids

# (first relation, second relation): the two-hop question template, {} = the first relation's subject
CHAINS: dict[tuple[str, str], str] = {
    ("landmark_in_country", "country_capital_city"): "The capital city of the country where {} is located is",
    ("landmark_in_country", "country_language"): "The language used in the country where {} is located is",
    ("landmark_in_country", "country_currency"): "The official currency of the country where {} is located is the",
    ("food_from_country", "country_capital_city"): "The capital city of the country {} comes from is",
    ("food_from_country", "country_language"): "The language used in the country {} comes from is",
    ("company_hq", "city_in_country"): "The city where {} is headquartered is in the country of",
    ("city_in_country", "country_capital_city"): "The capital city of the country {} is in is",
}
ALWAYS = {"input", "logits"}


@dataclass
class Chain:
    first: str
    second: str
    subject: str
    bridge: str  # o1
    answer: str  # o2
    two_hop: str  # the question
    hop1: str  # r1's prompt about the subject
    hop2: str  # r2's prompt about the bridge entity
    samples1: tuple[tuple[str, str], ...] = ()  # (s', o2 of s') for corrupting the two-hop question
    samples_r1: tuple[tuple[str, str], ...] = ()
    samples_r2: tuple[tuple[str, str], ...] = ()


def build_chains(r1, r2, template: str, limit: int) -> list[Chain]:
    """Chains (s, o1, o2) over r1's samples in KC's order whose object is a subject of r2 (its first object)."""
    from bench.analyses import kc_facts
    from bench.relation_circuits import fill, kc_template

    second = {}
    for s, o in r2.samples:
        second.setdefault(s, o)
    composed = tuple((s, second[o]) for s, o in r1.samples if o in second)
    chains = []
    for fact in kc_facts(r1):
        if fact.object in second and len(chains) < limit:
            chains.append(Chain(r1.name, r2.name, fact.subject, fact.object, second[fact.object],
                                fill(template, fact.subject), fact.prompt, fill(kc_template(r2), fact.object),
                                composed, tuple(r1.samples), tuple(r2.samples)))
    return chains


def hop_lens(bundle, chain: Chain) -> dict[str, list]:
    """Ranks and probabilities of the bridge entity and the answer (first tokens) after every layer, at the
    two-hop question's last position."""
    tok = bundle.tokenizer
    lens = read_prompt(bundle.model, bundle.arch, prompt_ids(tok, chain.two_hop))
    logits = unembed(bundle.model, bundle.arch, lens.residual)
    out: dict[str, list] = {}
    for key, text in (("bridge", chain.bridge), ("answer", chain.answer)):
        out[f"{key}_rank"], out[f"{key}_prob"] = rank_and_prob(logits, target_ids(tok, text)[0])
    return out


def contained(part, whole) -> float:
    """Share of `part`'s nodes (heads and MLPs) that `whole` also has: KC's Hit_node (App. C.1, eq. 4)
    without the input and logits nodes, which every circuit has."""
    nodes = set(part.nodes) - ALWAYS
    return len(nodes & set(whole.nodes)) / len(nodes) if nodes else 0.0


def contained_edges(part, whole) -> float:
    """Share of `part`'s edges that `whole` also has (KC's Table 5 edge row)."""
    return len(set(part.edges) & set(whole.edges)) / len(part.edges) if part.edges else 0.0


def chain_circuits(bundle, chain: Chain, top_n: int) -> dict[str, Any]:
    from bench.analyses import corrupting_prompt, prompt_circuit
    from circuits.circuit import overlap

    tok = bundle.tokenizer
    specs = {"two_hop": (chain.two_hop, chain.subject, chain.answer, chain.samples1),
             "hop1": (chain.hop1, chain.subject, chain.bridge, chain.samples_r1),
             "hop2": (chain.hop2, chain.bridge, chain.answer, chain.samples_r2)}
    circuits = {}
    for key, (prompt, subject, answer, samples) in specs.items():
        answer_id = target_ids(tok, answer)[0]
        partner = corrupting_prompt(tok, prompt, subject, samples, {answer_id})
        if partner is None:
            return {"note": f"{key}: no corrupting subject of the same token length"}
        circuits[key] = prompt_circuit(bundle, prompt_ids(tok, prompt), partner[0], answer_id, answer, top_n)
    two = circuits["two_hop"]
    return {"node_jaccard_hop1": overlap(two, circuits["hop1"])["node_jaccard"],
            "node_jaccard_hop2": overlap(two, circuits["hop2"])["node_jaccard"],
            "edge_jaccard_hop1": overlap(two, circuits["hop1"])["edge_jaccard"],
            "edge_jaccard_hop2": overlap(two, circuits["hop2"])["edge_jaccard"],
            "hop1_nodes_in_two_hop": contained(circuits["hop1"], two),
            "hop1_edges_in_two_hop": contained_edges(circuits["hop1"], two),
            "hop2_edges_in_two_hop": contained_edges(circuits["hop2"], two),
            "hop2_nodes_in_two_hop": contained(circuits["hop2"], two),
            "hop1_and_hop2_nodes_in_two_hop": contained(_union(circuits["hop1"], circuits["hop2"]), two)}


def _union(a, b):
    from circuits.circuit import Circuit

    return Circuit(a.method, a.answer, {**a.edges, **b.edges}, sorted(set(a.nodes) | set(b.nodes)), a.n_graph_edges)


def multihop_summary(rows: list[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    done = [r for r in rows if "node_jaccard_hop1" in r.get("circuits", {})]

    def mean(key: str) -> float | None:
        return sum(r["circuits"][key] for r in done) / len(done) if done else None

    logs = {k: torch.tensor([r["lens"][f"{k}_rank"] for r in rows], dtype=torch.float64).log10().mean(0).tolist()
            for k in ("bridge", "answer")}
    return {"n_chains": len(rows), "n_with_circuits": len(done),
            "share_two_hop_top1": sum(r["two_hop_rank"] == 1 for r in rows) / len(rows),
            **{key: mean(key) for key in ("node_jaccard_hop1", "node_jaccard_hop2", "edge_jaccard_hop1",
                                          "edge_jaccard_hop2", "hop1_nodes_in_two_hop", "hop2_nodes_in_two_hop",
                                          "hop1_edges_in_two_hop", "hop2_edges_in_two_hop",
                                          "hop1_and_hop2_nodes_in_two_hop")},
            "mean_log10_rank_bridge": logs["bridge"], "mean_log10_rank_answer": logs["answer"],
            "n_layers": n_layers}
