"""`python -m bench multihop`: two-hop questions built from the LRE relations, their circuits against the
single hops' circuits, and the bridge entity through the layers. See bench/multihop.py. Writes
multihop.json and multihop.png."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bench.cmd_heads import add_common_arguments
from bench.plotting import pyplot, save_figure

NAME = "multihop"
HELP = "two-hop questions from LRE relation chains: circuit reuse of the single hops, bridge entity by layer"

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_facts=10, top_n=300)


def pick_chains(bundle, root: Path, names: set[str] | None, n: int, scan: int, top_k: int):
    """Up to n chains, round-robin over the chain types whose two relation files are under root, whose
    single hops the model answers within its top_k."""
    from bench.analyses import load, relation_files
    from bench.multihop import CHAINS, build_chains
    from bench.relation_circuits import Fact, answer_ranks

    files = relation_files(root)
    groups, used = [], []
    for (first, second), template in CHAINS.items():
        if first not in files or second not in files or (names and not {first, second} <= names):
            continue
        chains = build_chains(load(files[first]), load(files[second]), template, scan)
        if not chains:
            continue
        hop1 = answer_ranks(bundle.model, bundle.tokenizer, [Fact(c.subject, c.bridge, c.hop1) for c in chains],
                            bundle.device)
        hop2 = answer_ranks(bundle.model, bundle.tokenizer, [Fact(c.bridge, c.answer, c.hop2) for c in chains],
                            bundle.device)
        groups.append([c for c, a, b in zip(chains, hop1, hop2) if a <= top_k and b <= top_k])
        used.append(f"{first} → {second}")
    chosen = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    return chosen[:n], used


def main(args: argparse.Namespace) -> int:
    from bench.analyses import output_folder, provenance_fields, write_json
    from bench.lre import LRE_ROOT
    from bench.multihop import CHAINS, chain_circuits, hop_lens, multihop_summary
    from bench.relation_circuits import Fact, answer_ranks
    from lmview.models import load_model

    if args.n_facts < 1 or args.top_n < 1 or args.known_top_k < 1:
        raise ValueError("--n-facts, --top-n and --known-top-k must be at least 1")
    root = Path(args.lre_root) if args.lre_root else LRE_ROOT
    names = {s.strip() for s in args.relations.split(",")} if args.relations else None
    started = time.perf_counter()
    bundle = load_model(args.model, args.device, args.dtype)
    chains, used = pick_chains(bundle, root, names, args.n_facts, args.scan, args.known_top_k)
    if not chains:
        pairs = ", ".join(f"{a} → {b}" for a, b in CHAINS)
        raise ValueError(f"no two-hop chain whose single hops the model answers under {root} (chains: {pairs})")
    rows = []
    for chain in chains:
        log.info("multihop: %s → %s: %s", chain.first, chain.second, chain.subject)
        rank = answer_ranks(bundle.model, bundle.tokenizer, [Fact(chain.subject, chain.answer, chain.two_hop)],
                            bundle.device)[0]
        rows.append({"chain": f"{chain.first} → {chain.second}", "subject": chain.subject, "bridge": chain.bridge,
                     "answer": chain.answer, "two_hop": chain.two_hop, "hop1": chain.hop1, "hop2": chain.hop2,
                     "two_hop_rank": rank, "lens": hop_lens(bundle, chain),
                     "circuits": chain_circuits(bundle, chain, args.top_n)})
    report = dict(multihop_summary(rows, bundle.arch.n_layers), chains=rows, chain_types=used, top_n=args.top_n,
                  **provenance_fields(
                      bundle, started, criterion=f"both single hops' answers within the model's top {args.known_top_k}",
                      data="two-hop chains built from the LRE relations (bench/multihop.py CHAINS); no MQuAKE file"))
    out = output_folder(args, NAME)
    write_json(out, "multihop.json", report)
    plot(report, out / "multihop.png", bundle.name)
    print(f"wrote {out}/multihop.json, multihop.png ({report['n_chains']} chains)")
    print(f"two-hop answered (top-1) {report['share_two_hop_top1']:.2f}; first hop's nodes in the two-hop circuit "
          f"{report['hop1_nodes_in_two_hop']}; second hop's {report['hop2_nodes_in_two_hop']}")
    return 0


def plot(report: dict[str, Any], path: Path, model: str) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 3.6))
    layers = range(report["n_layers"])
    axes[0].plot(layers, report["mean_log10_rank_bridge"], label="bridge entity (first hop's answer)", color="#C44E52")
    axes[0].plot(layers, report["mean_log10_rank_answer"], label="answer (second hop's)", color="#4C72B0")
    axes[0].set_xlabel("layer (residual after it, logit lens)")
    axes[0].set_ylabel("mean log10 rank at the last token")
    axes[0].legend(fontsize=8)
    keys = ["hop1_nodes_in_two_hop", "hop2_nodes_in_two_hop", "node_jaccard_hop1", "node_jaccard_hop2"]
    values = [report[k] or 0.0 for k in keys]
    axes[1].bar(range(len(keys)), values, color=["#4C72B0", "#4C72B0", "#DD8452", "#DD8452"])
    axes[1].set_xticks(range(len(keys)), ["hop 1 nodes\nin two-hop", "hop 2 nodes\nin two-hop",
                                          "node Jaccard\nhop 1", "node Jaccard\nhop 2"], fontsize=8)
    axes[1].set_ylim(0, 1)
    save_figure(fig, path, suptitle=f"{model}: {report['n_chains']} two-hop questions")
