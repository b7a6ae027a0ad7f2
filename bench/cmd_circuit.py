"""`python -m bench circuit`: the knowledge circuit of one relation (LRE file) or of one fact.

Writes to --output: circuit.json (circuits.circuit.Circuit), report.json (circuits/relation.py's
evaluation plus the per-layer view of circuits/layers.py), circuit.svg and circuit.png (Graphviz; skipped
with one warning when `dot` is missing) and layers.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

NAME = "circuit"
HELP = "find and evaluate the knowledge circuit of a relation (or of one fact); write JSON and figures"

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.models import DEFAULT_MODEL
    from circuits.attribute import METHODS
    from circuits.circuit import DEFAULT_TOP_N
    from circuits.relation import RELATION_TOP_N

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--relation", default=None, help="LRE relation name (../shared/data/lre/*/NAME.json) or a path")
    parser.add_argument("--prompt", default=None, help="one fact's prompt instead of a relation (with --answer)")
    parser.add_argument("--answer", default=None, help="the answer the prompt should produce (with --prompt)")
    parser.add_argument("--subject", default=None,
                        help="with --prompt: the span to corrupt (default: the last run of capitalised words)")
    parser.add_argument("--method", default="eap", choices=METHODS, help="attribution method (default eap)")
    parser.add_argument("--top-n", type=int, default=None,
                        help=f"edges in the circuit (default {RELATION_TOP_N} for a relation, {DEFAULT_TOP_N} for one fact)")
    parser.add_argument("--output", default=None, help="output folder (default circuits-out/<relation or fact>)")
    parser.add_argument("--known-top-k", type=int, default=1,
                        help="keep facts whose answer's first token is in the model's top k (default 1; 0 keeps all)")
    parser.add_argument("--validation-fraction", type=float, default=0.5, help="share of known subjects that build the circuit")
    parser.add_argument("--max-validation", type=int, default=32, help="at most this many validation prompts")
    parser.add_argument("--max-test", type=int, default=64, help="at most this many test prompts")
    parser.add_argument("--random-draws", type=int, default=3, help="random circuits averaged for the baseline")
    parser.add_argument("--no-curve", action="store_true", help="skip the faithfulness curve (10 patched runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def guess_subject(prompt: str) -> str:
    """The last run of capitalised words that does not start the prompt, else its last capitalised word."""
    words = list(re.finditer(r"[A-Z][\w.'-]*(?:\s+[A-Z][\w.'-]*)*", prompt))
    inner = [m for m in words if m.start() > 0]
    chosen = (inner or words)
    if not chosen:
        raise ValueError("could not guess the subject of --prompt; give it with --subject")
    return chosen[-1].group(0)


def _check(args: argparse.Namespace) -> None:
    if (args.relation is None) == (args.prompt is None):
        raise ValueError("give either --relation NAME|PATH or --prompt \"...\" --answer \"...\"")
    if args.prompt is not None and not args.answer:
        raise ValueError("--prompt needs --answer")
    if args.top_n is None:
        from circuits.circuit import DEFAULT_TOP_N
        from circuits.relation import RELATION_TOP_N

        args.top_n = RELATION_TOP_N if args.relation is not None else DEFAULT_TOP_N
    if args.top_n < 1:
        raise ValueError("--top-n must be at least 1")
    if not 0 < args.validation_fraction < 1:
        raise ValueError("--validation-fraction must be between 0 and 1")
    if args.random_draws < 1:
        raise ValueError("--random-draws must be at least 1")
    if args.known_top_k < 0:
        raise ValueError("--known-top-k must be 0 (keep all) or more")


def _subject_pool() -> list[tuple[str, str]]:
    """Corruption partners for one fact: every subject of the built-in facts and of the LRE relations."""
    from bench.data import load_dataset
    from bench.lre import LRE_ROOT, load_relation, relation_names

    pairs = {(c.subject, c.target_true) for c in load_dataset("facts").cases}
    for name in relation_names(LRE_ROOT):
        pairs |= set(load_relation(name).samples)
    return sorted(pairs)


def _inputs(args: argparse.Namespace, bundle) -> tuple[Any, list[tuple[str, str]], dict[str, Any]]:
    """(RelationSplit, corruption samples, source description)."""
    from bench.lre import load_relation
    from circuits.relation import Fact, RelationSplit, answer_ranks, prepare_split, relation_facts

    if args.relation is not None:
        relation = load_relation(args.relation)
        split = prepare_split(bundle, relation.name, relation_facts(relation), relation.samples,
                              known_top_k=args.known_top_k or None, validation_fraction=args.validation_fraction,
                              seed=args.seed, max_validation=args.max_validation, max_test=args.max_test)
        source = {"kind": "lre", "name": relation.name, "path": relation.path, "sha256": relation.sha256,
                  "templates": list(relation.prompt_templates)}
        return split, list(relation.samples), source
    subject = args.subject or guess_subject(args.prompt)
    if subject not in args.prompt:
        raise ValueError(f"subject {subject!r} is not in the prompt")
    fact = Fact(subject, args.answer.strip(), args.prompt)
    rank = answer_ranks(bundle.model, bundle.tokenizer, [fact], bundle.device)[0]
    split = RelationSplit("fact", [fact], [fact], {"prompts_total": 1, "answer_rank": rank,
                                                   "known_criterion": "one fact: no filter",
                                                   "note": "one fact: the same prompt builds and scores the circuit"})
    source = {"kind": "fact", "prompt": args.prompt, "answer": fact.object, "subject": subject}
    return split, _subject_pool() + [(subject, fact.object)], source


def main(args: argparse.Namespace) -> int:
    from bench.models import load_model
    from circuits.draw import circuit_dot, render
    from circuits.layers import layer_view, plot_layers
    from circuits.relation import build_relation_circuit, facts_as_dicts

    _check(args)
    started = time.perf_counter()
    bundle = load_model(args.model, args.device, args.dtype)
    split, samples, source = _inputs(args, bundle)
    log.info("circuit: %s: %s", split.name, json.dumps(split.counts))
    result = build_relation_circuit(bundle, split, samples, method=args.method, top_n=args.top_n, seed=args.seed,
                                    random_draws=args.random_draws, curve=not args.no_curve)
    name = source.get("name") or re.sub(r"[^\w-]+", "_", source.get("subject", "fact"))
    out = Path(args.output or Path("circuits-out") / name)
    out.mkdir(parents=True, exist_ok=True)
    facts = result.test_facts
    view = layer_view(bundle, [f.prompt for f in facts], [f.subject for f in facts], [f.object for f in facts],
                      set(result.circuit.nodes))
    report = dict(result.report, source=source, model=bundle.provenance, layers=view,
                  test_facts=facts_as_dicts(facts), command=" ".join(["python -m bench", *sys.argv[1:]]),
                  files=["circuit.json", "report.json", "circuit.svg", "circuit.png", "layers.png"])
    report["seconds"]["total"] = time.perf_counter() - started
    result.circuit.save(out / "circuit.json")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    title = f"{bundle.name}: {name}, {args.method}, top {len(result.circuit.edges)} edges"
    drawn = render(circuit_dot(result.circuit.edges, title), [out / "circuit.svg", out / "circuit.png"])
    plot_layers(view, out / "layers.png", f"{bundle.name}: {name} (test prompts: {view['n_prompts']})")
    table = report["hit_at_10"]
    print(f"wrote {out}/circuit.json, report.json, layers.png" + (", circuit.svg, circuit.png" if drawn else
                                                                 " (no figures: graphviz 'dot' is missing)"))
    print(f"{name}: {report['facts'].get('test_prompts')} test prompts, circuit of {table['n_edges']} edges; "
          f"Hit@10 full model {table['full_model']:.3f}, circuit {table['circuit']:.3f}, "
          f"random circuit {table['random_circuit']:.3f}; faithfulness {report['faithfulness']['faithfulness']:.3f}"
          + (f"; CPR {report['faithfulness_curve']['cpr']:.3f}, CMD {report['faithfulness_curve']['cmd']:.3f}"
             if "faithfulness_curve" in report else ""))
    return 0
