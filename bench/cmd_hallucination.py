"""`python -m bench hallucination`: facts the model gets wrong, where the right answer is lost, and the
circuit of the wrong answer against the right one (Knowledge Circuits §5.1). See bench/hallucination.py.

Writes hallucination.json and hallucination.png (the right and wrong answers' mean log10 rank through the
layers; where the right answer is lost; the mean DLA toward the wrong answer per head and MLP).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bench.cmd_heads import add_common_arguments
from bench.plotting import pyplot, save_figure

NAME = "hallucination"
HELP = "facts the model gets wrong: where the right answer is lost (logit lens, DLA) and wrong vs right circuits"

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_facts=20)
    parser.add_argument("--any-wrong", action="store_true",
                        help="also count a top-1 token that starts no other object of the relation")
    parser.add_argument("--top-n", type=int, default=300,
                        help="edges per right/wrong circuit (default 300; 0: no circuits)")


def wrong_facts(bundle, relations: list[tuple[str, Path]], n: int, scan: int, any_wrong: bool):
    """Up to n hallucinated facts, round-robin over the relations (KC's order within each)."""
    from bench.analyses import kc_facts, load, next_tokens
    from bench.hallucination import WrongFact
    from lmview.tokens import target_ids

    tok = bundle.tokenizer
    per_relation: list[list[WrongFact]] = []
    scanned: dict[str, dict[str, int]] = {}
    for name, path in relations:
        relation = load(path)
        facts = kc_facts(relation)[:scan]
        objects = {target_ids(tok, o)[0]: o for _, o in relation.samples}
        found = []
        for fact, top in zip(facts, next_tokens(bundle, [f.prompt for f in facts])):
            right = target_ids(tok, fact.object)[0]
            if top != right and (any_wrong or top in objects):
                found.append(WrongFact(name, fact.prompt, fact.subject, fact.object, top, tok.decode([top]),
                                       relation.samples))
        scanned[name] = {"prompts": len(facts), "wrong": len(found)}
        per_relation.append(found)
    chosen = [group[i] for i in range(max(map(len, per_relation), default=0)) for group in per_relation
              if i < len(group)]
    return chosen[:n], scanned


def main(args: argparse.Namespace) -> int:
    from bench.analyses import output_folder, pick_relations, provenance_fields, write_json
    from bench.hallucination import hallucination_report
    from bench.lre import LRE_ROOT
    from lmview.models import load_model

    if args.n_facts < 1 or args.scan < 1 or args.top_n < 0:
        raise ValueError("--n-facts and --scan must be at least 1 and --top-n at least 0")
    relations = pick_relations(args.relations, Path(args.lre_root) if args.lre_root else LRE_ROOT)
    started = time.perf_counter()
    bundle = load_model(args.model, args.device, args.dtype)
    facts, scanned = wrong_facts(bundle, relations, args.n_facts, args.scan, args.any_wrong)
    if not facts:
        raise ValueError(f"the model gets no fact wrong in the scanned prompts of {', '.join(scanned)}")
    log.info("hallucination: %d facts the model gets wrong", len(facts))
    report = hallucination_report(bundle, facts, args.top_n or None)
    criterion = "top-1 token ≠ the object's first token" + (
        "" if args.any_wrong else ", and it is the first token of another object of the relation")
    report.update(provenance_fields(bundle, started, scanned=scanned, criterion=criterion))
    out = output_folder(args, NAME)
    write_json(out, "hallucination.json", report)
    plot(report, bundle.arch.n_layers, out / "hallucination.png", bundle.name)
    print(f"wrote {out}/hallucination.json, hallucination.png ({report['n_facts']} facts)")
    lost = sorted(((v, k) for k, v in report["lost_at_counts"].items() if v), reverse=True)[:5]
    print("right answer lost at: " + ", ".join(f"{k} ({v})" for v, k in lost))
    print("toward the wrong answer (mean DLA): " + ", ".join(f"{n} {v:+.2f}" for n, v in report["toward_wrong_mean"][:5]))
    return 0


def plot(report: dict[str, Any], n_layers: int, path: Path, model: str) -> None:
    names = report["components"]
    xs = [i / 2 for i in range(len(names))]  # a<l> at l, m<l> at l + 0.5
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 3.8))
    axes[0].plot(xs, report["mean_log10_rank_right"], label="right answer", color="#4C72B0")
    axes[0].plot(xs, report["mean_log10_rank_wrong"], label="model's wrong answer", color="#C44E52")
    axes[0].set_xlabel("layer (after attention: l, after MLP: l + 0.5)")
    axes[0].set_ylabel("mean log10 rank")
    axes[0].legend(fontsize=8)
    attn = [report["lost_at_counts"][f"a{l}"] for l in range(n_layers)]
    mlp = [report["lost_at_counts"][f"m{l}"] for l in range(n_layers)]
    axes[1].bar([l - 0.2 for l in range(n_layers)], attn, width=0.4, label="attention", color="#DD8452")
    axes[1].bar([l + 0.2 for l in range(n_layers)], mlp, width=0.4, label="MLP", color="#55A868")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("facts whose right answer is lost here")
    axes[1].legend(fontsize=8)
    heads = report["mean_dla_wrong_minus_right_heads"]
    grid = [row + [m] for row, m in zip(heads, report["mean_dla_wrong_minus_right_mlps"])]
    bound = max(abs(v) for row in grid for v in row) or 1.0
    image = axes[2].imshow(list(map(list, zip(*grid))), aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("head (last row: MLP)")
    fig.colorbar(image, ax=axes[2], label="mean DLA, logit(wrong) − logit(right)")
    save_figure(fig, path, suptitle=f"{model}: {report['n_facts']} facts the model gets wrong")
