"""`python -m bench reuse`: which components relation circuits share (Knowledge Circuits §4.1).

For each relation under --lre-root (or --relations), its circuit is built on its known facts (KC's
template, KC's split, corrupted patching and the log-prob metric, a fixed --top-n edges) and saved to
<output>/circuits/<relation>.json; an existing file there is read instead (so an interrupted run resumes,
and circuits from elsewhere can be dropped in). Writes reuse.json (bench/reuse.py) and reuse-matrix.png
(the edge-Jaccard matrix) and reuse-shared.png (the nodes most circuits share, by layer).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from bench.cmd_heads import add_common_arguments
from bench.plotting import pyplot, save_figure

NAME = "reuse"
HELP = "overlap of relation circuits across relations and knowledge types; the components most share"

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--top-n", type=int, default=1000, help="edges per relation circuit (default 1000)")
    parser.add_argument("--min-share", type=float, default=0.5,
                        help="list components in at least this share of the circuits (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)


def relation_circuit(bundle, name: str, path: Path, top_n: int, seed: int, n_facts: int, known_top_k: int = 1,
                     scan: int | None = None):
    """The relation's circuit on its known facts among the first `scan` prompts (KC's template, order and
    split), with its report."""
    from bench.analyses import kc_facts, load
    from bench.relation_circuits import build_relation_circuit, kc_split
    from circuits.relation import CircuitSetting

    relation = load(path)
    split = kc_split(bundle, name, kc_facts(relation)[:scan], known_top_k=known_top_k, n_examples=max(1, n_facts // 2))
    result = build_relation_circuit(bundle, split, relation.samples, setting=CircuitSetting(), top_n=top_n,
                                    seed=seed, random_draws=1, curve=False)
    return result.circuit, result.report


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    hit = report.get("hit_at_10", {}).get("test", {})
    return {"facts": report.get("facts"), "hit_at_10_test": hit,
            "faithfulness_test": report.get("faithfulness", {}).get("test", {}).get("faithfulness")}


def main(args: argparse.Namespace) -> int:
    from bench.analyses import command_line, output_folder, pick_relations, relation_kind, write_json
    from bench.lre import LRE_ROOT
    from bench.reuse import reuse_report
    from circuits.circuit import Circuit
    from lmview.models import load_model

    if args.top_n < 1 or not 0 < args.min_share <= 1 or args.n_facts < 2:
        raise ValueError("--top-n must be ≥ 1, --n-facts ≥ 2 and --min-share in (0, 1]")
    root = Path(args.lre_root) if args.lre_root else LRE_ROOT
    relations = pick_relations(args.relations, root)
    out = output_folder(args, NAME)
    (out / "circuits").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = None
    circuits: dict[str, Circuit] = {}
    details: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, path in relations:
        file = out / "circuits" / f"{name.replace('/', '__')}.json"
        if file.exists():
            circuits[name] = Circuit.from_json(json.loads(file.read_text()))
            details[name] = {"source": str(file)}
            continue
        bundle = bundle or load_model(args.model, args.device, args.dtype)
        log.info("reuse: building the circuit of %s", name)
        try:
            circuit, report = relation_circuit(bundle, name, path, args.top_n, args.seed, args.n_facts,
                                               args.known_top_k, args.scan)
        except ValueError as exc:  # too few known facts or corruption partners: this relation only
            skipped[name] = str(exc)
            log.warning("reuse: %s skipped: %s", name, exc)
            continue
        circuit.save(file)
        circuits[name] = circuit
        details[name] = dict(summary_of(report), source=str(file))
    if len(circuits) < 2:
        raise ValueError(f"reuse needs at least two relation circuits; got {len(circuits)} "
                         f"(skipped: {', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none'})")
    kinds = {name: relation_kind(path, root) for name, path in relations if name in circuits}
    report = dict(reuse_report(circuits, kinds, args.min_share), command=command_line(), top_n=args.top_n,
                  circuits=details, skipped=skipped, seconds=round(time.perf_counter() - started, 1))
    if bundle is not None:
        report["model"] = bundle.provenance
    write_json(out, "reuse.json", report)
    plot_matrix(report, out / "reuse-matrix.png", str(args.model))
    plot_shared(report, out / "reuse-shared.png", str(args.model))
    print(f"wrote {out}/reuse.json, reuse-matrix.png, reuse-shared.png ({len(circuits)} relations)")
    top = ", ".join(f"{r['component']} ({r['n_relations']})" for r in report["shared_nodes"][:10])
    print(f"mean edge Jaccard {report['mean_edge_jaccard']:.3f}; nodes in ≥ {args.min_share:g} of circuits: {top or '–'}")
    return 0


def plot_matrix(report: dict[str, Any], path: Path, model: str) -> None:
    names = report["relations"]
    size = max(4.5, 0.32 * len(names) + 2.5)
    fig, ax = pyplot().subplots(figsize=(size + 1, size))
    image = ax.imshow(report["edge_jaccard"], vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(image, ax=ax, label="edge Jaccard")
    save_figure(fig, path, ax=ax, title=f"{model}: relation circuits, top {report['top_n']} edges each", title_size=9)


def plot_shared(report: dict[str, Any], path: Path, model: str, k: int = 30) -> None:
    rows = report["shared_nodes"][:k]
    fig, ax = pyplot().subplots(figsize=(max(5.0, 0.3 * len(rows) + 2), 3.4))
    ax.bar(range(len(rows)), [r["share"] for r in rows], color="#4C72B0")
    ax.set_xticks(range(len(rows)), [r["component"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    save_figure(fig, path, ax=ax, ylabel="share of relation circuits", title_size=9,
                title=f"{model}: nodes in ≥ {report['min_share']:g} of {len(report['relations'])} relation circuits")
