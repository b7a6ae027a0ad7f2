"""`python -m bench heads`: mover, relation and mixture heads per relation (Knowledge Circuits §4.2).

Writes to --output: heads.json (per relation: the facts, each class's heads with their attention, source-
decomposed DLA and top output tokens, the layer distribution, the per-head means), heads-layers.png (how
many heads of each class sit at each layer, summed over the relations) and heads-attention.png (per
relation, every head's attention to the subject against its attention to the relation tokens, coloured
by class). See bench/heads.py for the method.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bench.plotting import pyplot, save_figure
from lmview.models import DEFAULT_MODEL

NAME = "heads"
HELP = "classify mover, relation and mixture heads per relation (KC §4.2), with their layers"
COLORS = {"mover": "#4C72B0", "relation": "#DD8452", "mixture": "#55A868"}

log = logging.getLogger("bench")


def add_common_arguments(parser: argparse.ArgumentParser, n_facts: int = 20, top_n: int | None = None) -> None:
    """Options every relation analysis takes; with top_n, also --top-n (edges per circuit) with that default."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--relations", default=None,
                        help="comma-separated relation names or .json paths (default: every relation under --lre-root)")
    parser.add_argument("--lre-root", default=None,
                        help="folder in the LRE/KC layout, <kind>/<relation>.json (default ../shared/data/lre)")
    parser.add_argument("--n-facts", type=int, default=n_facts,
                        help=f"facts per relation, in KC's order (default {n_facts})")
    parser.add_argument("--scan", type=int, default=200,
                        help="prompts per relation scanned for known facts, in KC's order (default 200)")
    parser.add_argument("--known-top-k", type=int, default=1,
                        help="a fact is used when its answer's first token is within the model's top k (default 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--output", default=None, help="output folder (default analyses-out/<command>-<model>)")
    if top_n is not None:
        parser.add_argument("--top-n", type=int, default=top_n, help=f"edges per circuit (default {top_n})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--min-attention", type=float, default=0.3, help="attention threshold (default 0.3)")
    parser.add_argument("--min-dla-fraction", type=float, default=0.1,
                        help="a source's DLA counts when ≥ this × the relation's largest head DLA (default 0.1)")


def known_facts_of(bundle, path: Path, n_facts: int, top_k: int, scan: int | None = None
                   ) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """The first n_facts facts (KC's order, the first `scan` prompts) whose answer is within the model's top_k."""
    from bench.analyses import load, ranked_facts

    relation = load(path)
    ranked = ranked_facts(bundle, relation, scan)
    known = [f for f, rank in ranked if rank <= top_k][:n_facts]
    counts = {"prompts": len(ranked), "known": sum(rank <= top_k for _, rank in ranked), "used": len(known),
              "known_criterion": f"the answer's first token within the model's top {top_k}"}
    return [(f.prompt, f.subject, f.object) for f in known], counts


def main(args: argparse.Namespace) -> int:
    from bench.analyses import command_line, output_folder, pick_relations, write_json
    from bench.heads import CLASSES, HeadRules, relation_report
    from bench.lre import LRE_ROOT
    from lmview.models import load_model

    if args.n_facts < 1 or args.known_top_k < 1 or args.scan < 1:
        raise ValueError("--n-facts, --scan and --known-top-k must be at least 1")
    if not 0 < args.min_attention <= 1 or not 0 <= args.min_dla_fraction <= 1:
        raise ValueError("--min-attention must be in (0, 1] and --min-dla-fraction in [0, 1]")
    relations = pick_relations(args.relations, Path(args.lre_root) if args.lre_root else LRE_ROOT)
    rules = HeadRules(min_attention=args.min_attention, min_dla_fraction=args.min_dla_fraction)
    started = time.perf_counter()
    bundle = load_model(args.model, args.device, args.dtype)
    out = output_folder(args, NAME)
    report: dict[str, Any] = {"command": command_line(), "model": bundle.provenance, "rules": rules.describe(),
                              "relations": {}, "skipped": {}}
    for name, path in relations:
        facts, counts = known_facts_of(bundle, path, args.n_facts, args.known_top_k, args.scan)
        if not facts:
            report["skipped"][name] = f"no fact known to the model ({counts['prompts']} prompts)"
            log.warning("heads: %s skipped: %s", name, report["skipped"][name])
            continue
        log.info("heads: %s: %d facts", name, len(facts))
        report["relations"][name] = dict(relation_report(bundle, facts, rules), counts=counts)
    if not report["relations"]:
        raise ValueError(f"no relation has a fact the model knows: {', '.join(report['skipped'])}")
    n_layers = bundle.arch.n_layers
    report["layer_distribution"] = {c: [sum(r["layer_distribution"][c][l] for r in report["relations"].values())
                                        for l in range(n_layers)] for c in CLASSES}
    report["shared_heads"] = shared_heads(report["relations"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, "heads.json", report)
    plot_layers(report, n_layers, out / "heads-layers.png", bundle.name)
    plot_attention(report, out / "heads-attention.png", bundle.name)
    print(f"wrote {out}/heads.json, heads-layers.png, heads-attention.png")
    for name, rel in report["relations"].items():
        print(f"{name} ({rel['n_facts']} facts): " + "; ".join(
            f"{c} {', '.join(h['head'] for h in rel['heads'][c]) or '–'}" for c in CLASSES))
    return 0


def shared_heads(relations: dict[str, Any]) -> list[dict[str, Any]]:
    """Heads classified (in any class) in at least two relations, most relations first."""
    seen: dict[str, dict[str, str]] = {}
    for name, rel in relations.items():
        for cls, heads in rel["heads"].items():
            for head in heads:
                seen.setdefault(head["head"], {})[name] = cls
    rows = [{"head": h, "n_relations": len(by), "classes": by} for h, by in seen.items() if len(by) >= 2]
    return sorted(rows, key=lambda r: (-r["n_relations"], r["head"]))


def plot_layers(report: dict[str, Any], n_layers: int, path: Path, model: str) -> None:
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.28 * n_layers + 2), 3.4))
    bottom = [0] * n_layers
    for cls, color in COLORS.items():
        counts = report["layer_distribution"][cls]
        ax.bar(range(n_layers), counts, bottom=bottom, color=color, label=cls)
        bottom = [b + c for b, c in zip(bottom, counts)]
    save_figure(fig, path, ax=ax, xlabel="layer", ylabel="heads (summed over relations)",
                title=f"{model}: special heads by layer ({len(report['relations'])} relations)", legend_size=8)


def plot_attention(report: dict[str, Any], path: Path, model: str) -> None:
    names = list(report["relations"])
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(3.3 * ncols, 3.1 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        rel = report["relations"][name]
        per = rel["per_head"]
        xs = [v for row in per["attention_subject"] for v in row]
        ys = [v for row in per["attention_relation"] for v in row]
        ax.scatter(xs, ys, s=6, color="#BBBBBB")
        for cls, color in COLORS.items():
            heads = rel["heads"][cls]
            ax.scatter([h["attention_subject"] for h in heads], [h["attention_relation"] for h in heads],
                       s=22, color=color, label=cls)
            for h in heads[:4]:
                ax.annotate(h["head"], (h["attention_subject"], h["attention_relation"]), fontsize=6)
        ax.set_title(f"{name} ({rel['n_facts']} facts)", fontsize=8)
        ax.set_xlabel("attention to subject", fontsize=7)
        ax.set_ylabel("attention to relation tokens", fontsize=7)
    axes.flat[0].legend(fontsize=6)
    save_figure(fig, path, suptitle=f"{model}: attention at the last token, per head (grey: unclassified)")
