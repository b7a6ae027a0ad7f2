"""`python -m bench incontext`: one fact's circuit without and with demonstrations (Knowledge Circuits
§5.2). See bench/incontext.py. Writes incontext.json and incontext.png (the heads that appear with
demonstrations: how often, their layers, and their attention to the demonstrations)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bench.cmd_heads import add_common_arguments
from bench.plotting import pyplot, save_figure

NAME = "incontext"
HELP = "circuits of the same fact without and with demonstrations: overlap and newly appearing heads"

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_facts=10, top_n=300)
    parser.add_argument("--shots", type=int, default=3, help="demonstrations before the query (default 3)")
    parser.add_argument("--seed", type=int, default=0)


def pick_facts(bundle, relations: list[tuple[str, Path]], n: int, scan: int, shots: int, top_k: int, seed: int):
    """Up to n (relation, zero-shot fact, few-shot fact, samples), round-robin over relations, whose answer
    is within the top_k with demonstrations."""
    from bench.analyses import kc_facts, load
    from bench.relation_circuits import answer_ranks, kc_template, make_fact

    groups = []
    for name, path in relations:
        relation = load(path)
        found = []
        for zero in kc_facts(relation)[:scan]:
            try:
                few = make_fact(kc_template(relation), zero.subject, zero.object, relation.samples, shots, seed)
            except ValueError:  # too few demonstrations for this subject
                continue
            found.append((name, zero, few, relation.samples))
        ranks = answer_ranks(bundle.model, bundle.tokenizer, [f for _, _, f, _ in found], bundle.device) if found else []
        groups.append([item for item, rank in zip(found, ranks) if rank <= top_k])
    chosen = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    return chosen[:n]


def main(args: argparse.Namespace) -> int:
    from bench.analyses import output_folder, pick_relations, provenance_fields, write_json
    from bench.incontext import incontext_fact, incontext_summary
    from bench.lre import LRE_ROOT
    from lmview.models import load_model

    if args.n_facts < 1 or args.shots < 1 or args.top_n < 1 or args.known_top_k < 1:
        raise ValueError("--n-facts, --shots, --top-n and --known-top-k must be at least 1")
    relations = pick_relations(args.relations, Path(args.lre_root) if args.lre_root else LRE_ROOT)
    started = time.perf_counter()
    bundle = load_model(args.model, args.device, args.dtype)
    facts = pick_facts(bundle, relations, args.n_facts, args.scan, args.shots, args.known_top_k, args.seed)
    if not facts:
        raise ValueError("no fact whose answer the model gives with demonstrations (try --known-top-k 10)")
    rows = []
    for name, zero, few, samples in facts:
        log.info("incontext: %s: %s", name, zero.subject)
        rows.append(dict(incontext_fact(bundle, zero, few, samples, args.top_n), relation=name))
    criterion = f"the answer's first token within the top {args.known_top_k} with demonstrations"
    report = dict(incontext_summary(rows, bundle.arch.n_layers), facts=rows, shots=args.shots, top_n=args.top_n,
                  **provenance_fields(bundle, started, criterion=criterion))
    out = output_folder(args, NAME)
    write_json(out, "incontext.json", report)
    plot(report, out / "incontext.png", bundle.name)
    print(f"wrote {out}/incontext.json, incontext.png ({report['n_facts']} facts)")
    print(f"node Jaccard zero- vs few-shot {report['mean_node_jaccard']}; new heads most often: "
          + ", ".join(f"{h['head']} ({h['n_facts']})" for h in report["new_heads_most_often"][:5]))
    return 0


def plot(report: dict[str, Any], path: Path, model: str) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 3.6))
    heads = report["new_heads_most_often"]
    axes[0].bar(range(len(heads)), [h["n_facts"] for h in heads], color="#55A868")
    axes[0].set_xticks(range(len(heads)), [h["head"] for h in heads], rotation=90, fontsize=7)
    axes[0].set_ylabel("facts where it appears with demonstrations")
    twin = axes[0].twinx()
    twin.plot(range(len(heads)), [h["mean_context_attention"] for h in heads], "o", color="#C44E52")
    twin.set_ylabel("attention to the demonstrations", color="#C44E52")
    axes[1].bar(range(len(report["new_heads_by_layer"])), report["new_heads_by_layer"], color="#4C72B0")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("newly appearing heads (all facts)")
    save_figure(fig, path, suptitle=f"{model}: circuits with {report['shots']} demonstrations vs none "
                                    f"({report['n_facts']} facts)")
