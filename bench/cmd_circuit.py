"""`python -m bench circuit`: the knowledge circuit of one relation (LRE file) or of one fact.

Writes to --output: circuit.json (circuits.circuit.Circuit), report.json (circuits/relation.py's
evaluation, its setting, and the per-layer view of circuits/layers.py), circuit.svg and circuit.png
(matplotlib), circuit.dot (the same figure as Graphviz source) and layers.png.

`--setting kc` is the Knowledge Circuits setting (Yao et al. 2024; the module docs of
bench/relation_circuits.py, circuits/relation.py and circuits/acdc.py): ACDC with threshold 0.01, zero
ablation and KC's match_nll metric, on KC's validation/test split of the first zero-shot template.
`--setting kc --method eap` is the labelled variant with EAP, its size chosen on the validation split.
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


SETTINGS = ("default", "kc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.relation_circuits import KC_EXAMPLES
    from circuits.ablation import ABLATIONS
    from circuits.acdc import ACDC_THRESHOLD
    from circuits.circuit import DEFAULT_TOP_N
    from circuits.relation import DISCOVERY_METHODS
    from circuits.metrics import METRICS
    from lmview.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--relation", default=None, help="LRE relation name (../shared/data/lre/*/NAME.json) or a path")
    parser.add_argument("--prompt", default=None, help="one fact's prompt instead of a relation (with --answer)")
    parser.add_argument("--answer", default=None, help="the answer the prompt should produce (with --prompt)")
    parser.add_argument("--subject", default=None,
                        help="with --prompt: the span to corrupt (default: the last run of capitalised words)")
    parser.add_argument("--setting", default="default", choices=SETTINGS,
                        help=f"kc: the Knowledge Circuits setting (acdc at threshold {ACDC_THRESHOLD}, zero ablation, "
                             f"match-nll, KC's split of {KC_EXAMPLES} validation and {KC_EXAMPLES} test prompts; "
                             "--method/--ablation/--metric/--acdc-threshold make a labelled variant); default: "
                             "by-subject split")
    parser.add_argument("--method", default=None, choices=DISCOVERY_METHODS,
                        help="discovery: an attribution method (top-n edges) or acdc (default eap; kc: acdc)")
    parser.add_argument("--acdc-threshold", type=float, default=None,
                        help=f"with acdc: an edge is removed when the metric rises by less than this (default "
                             f"{ACDC_THRESHOLD}, KC's)")
    parser.add_argument("--acdc-batch", type=int, default=None,
                        help="with acdc: edge tests run together in one forward pass, speculatively (the same "
                             "decisions as one at a time; default 1 on CPU, 16 on CUDA)")
    parser.add_argument("--ablation", default=None, choices=ABLATIONS,
                        help="what an edge outside the circuit carries (default corrupted; kc: zero)")
    parser.add_argument("--metric", default=None, choices=METRICS,
                        help="attribution and faithfulness metric (default logprob; kc: match-nll)")
    graphs = _graph_choices()
    parser.add_argument("--graph", default=None, choices=graphs,
                        help=f"k/v receivers of grouped-query models: {' or '.join(graphs)} (default {graphs[0]})")
    parser.add_argument("--shots", type=int, default=0,
                        help="few-shot demonstrations of the relation before every prompt (LRE's prompts; default 0)")
    parser.add_argument("--top-n", type=int, default=None,
                        help="edges in the circuit (default for a relation: the smallest size that reaches the full "
                             f"model's Hit@10 on the validation split; {DEFAULT_TOP_N} for one fact)")
    parser.add_argument("--size-grid", default=None,
                        help="comma-separated candidate sizes for the validation rule (default "
                             "25,50,100,200,500,1000,2000,5000,10000,20000)")
    parser.add_argument("--output", default=None, help="output folder (default circuits-out/<relation or fact>)")
    parser.add_argument("--known-top-k", type=int, default=1,
                        help="keep facts whose answer's first token is in the model's top k (default 1; 0 keeps all)")
    parser.add_argument("--validation-fraction", type=float, default=0.5, help="share of known subjects that build the circuit")
    parser.add_argument("--max-validation", type=int, default=32, help="at most this many validation prompts")
    parser.add_argument("--max-test", type=int, default=64, help="at most this many test prompts")
    parser.add_argument("--random-draws", type=int, default=3, help="random circuits averaged for the baseline")
    parser.add_argument("--no-curve", action="store_true", help="skip the CPR/CMD curves (20 patched runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def _graph_choices() -> tuple[str, ...]:
    import circuits.graph as graph

    return tuple(getattr(graph, "GRAPHS", ("grouped",)))


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
    acdc = discovery_method(args) == "acdc"
    if acdc and (args.top_n is not None or args.size_grid is not None):
        raise ValueError("--top-n and --size-grid do not apply to --method acdc: its threshold sets the size")
    if args.acdc_threshold is not None and not acdc:
        raise ValueError("--acdc-threshold needs --method acdc (or --setting kc)")
    if args.acdc_batch is not None and not acdc:
        raise ValueError("--acdc-batch needs --method acdc (or --setting kc)")
    if args.top_n is None and args.prompt is not None and not acdc:
        from circuits.circuit import DEFAULT_TOP_N

        args.top_n = DEFAULT_TOP_N
    if args.top_n is not None and args.top_n < 1:
        raise ValueError("--top-n must be at least 1")
    if args.size_grid is not None:
        try:
            args.size_grid = tuple(int(x) for x in args.size_grid.split(","))
        except ValueError:
            raise ValueError(f"--size-grid must be comma-separated integers, not {args.size_grid!r}")
        if not args.size_grid or min(args.size_grid) < 1:
            raise ValueError("--size-grid sizes must be at least 1")
    if args.shots < 0:
        raise ValueError("--shots must be 0 or more")
    if args.setting == "kc" and args.relation is None:
        raise ValueError("--setting kc needs --relation")
    if args.shots and args.relation is None:
        raise ValueError("--shots needs --relation (the demonstrations are the relation's other samples)")
    if not 0 < args.validation_fraction < 1:
        raise ValueError("--validation-fraction must be between 0 and 1")
    if args.random_draws < 1:
        raise ValueError("--random-draws must be at least 1")
    if args.known_top_k < 0:
        raise ValueError("--known-top-k must be 0 (keep all) or more")


def _chosen(args: argparse.Namespace) -> dict[str, Any]:
    return {"method": args.method, "ablation": args.ablation, "metric": args.metric,
            "acdc_threshold": args.acdc_threshold}


ACDC_BATCH_CUDA = 16


def acdc_batch(args: argparse.Namespace, device: str | object) -> int:
    """Speculative ACDC tests per forward pass: --acdc-batch, else 1 on CPU and ACDC_BATCH_CUDA on CUDA."""
    if args.acdc_batch is not None:
        return args.acdc_batch
    return ACDC_BATCH_CUDA if str(device).startswith("cuda") else 1


def discovery_method(args: argparse.Namespace) -> str:
    from circuits.relation import KC_SETTING, CircuitSetting

    return args.method or (KC_SETTING if args.setting == "kc" else CircuitSetting()).method


def circuit_setting(args: argparse.Namespace):
    """The CircuitSetting of the arguments. --setting kc defaults method, ablation, metric and the ACDC
    threshold to KC's; a flag that changes one of them makes a labelled variant (`setting_variant`)."""
    from circuits.relation import KC_SETTING, CircuitSetting

    base = KC_SETTING if args.setting == "kc" else CircuitSetting()
    return CircuitSetting(**{k: v if v is not None else getattr(base, k) for k, v in _chosen(args).items()},
                          shots=args.shots, graph=args.graph)


def setting_variant(args: argparse.Namespace) -> list[str]:
    """Where a --setting kc run departs from KC's method, ablation, metric or threshold: ["method=eap", ...]."""
    from circuits.relation import KC_SETTING

    if args.setting != "kc":
        return []
    return [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in _chosen(args).items()
            if v is not None and v != getattr(KC_SETTING, k)]


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
    from bench.relation_circuits import (Fact, RelationSplit, answer_ranks, kc_split, kc_template, make_fact,
                                         prepare_split, relation_facts)

    if args.relation is not None:
        relation = load_relation(args.relation)
        known = args.known_top_k or None
        if args.setting == "kc":
            template = kc_template(relation)
            facts = [make_fact(template, s, o, relation.samples, args.shots, args.seed) for s, o in relation.samples]
            split = kc_split(bundle, relation.name, facts, known_top_k=known)
            templates = [template]
        else:
            facts = relation_facts(relation, shots=args.shots, seed=args.seed)
            split = prepare_split(bundle, relation.name, facts, relation.samples, known_top_k=known,
                                  validation_fraction=args.validation_fraction, seed=args.seed,
                                  max_validation=args.max_validation, max_test=args.max_test)
            templates = list(relation.prompt_templates)
        source = {"kind": "lre", "name": relation.name, "path": relation.path, "sha256": relation.sha256,
                  "templates": templates}
        return split, list(relation.samples), source
    subject = args.subject or guess_subject(args.prompt)
    if subject not in args.prompt:
        raise ValueError(f"subject {subject!r} is not in the prompt")
    fact = Fact(subject, args.answer.strip(), args.prompt)
    rank = answer_ranks(bundle.model, bundle.tokenizer, [fact], bundle.device)[0]
    split = RelationSplit("fact", [fact], [fact], {"prompts_total": 1, "answer_rank": rank,
                                                   "known_criterion": "one fact: no filter",
                                                   "note": "one fact: the same prompt builds and scores the circuit"},
                          rule="one fact: the same prompt builds and scores the circuit")
    source = {"kind": "fact", "prompt": args.prompt, "answer": fact.object, "subject": subject}
    return split, _subject_pool() + [(subject, fact.object)], source


def main(args: argparse.Namespace) -> int:
    from bench.relation_circuits import build_relation_circuit, facts_as_dicts
    from circuits.draw import circuit_dot, draw_circuit
    from circuits.layers import layer_view, plot_layers
    from lmview.models import load_model

    _check(args)
    setting = circuit_setting(args)
    started = time.perf_counter()
    bundle = load_model(args.model, args.device, args.dtype)
    split, samples, source = _inputs(args, bundle)
    log.info("circuit: %s: %s", split.name, json.dumps(split.counts))
    from circuits.relation import SIZE_GRID

    result = build_relation_circuit(bundle, split, samples, setting=setting, top_n=args.top_n, seed=args.seed,
                                    size_grid=args.size_grid or SIZE_GRID, random_draws=args.random_draws,
                                    curve=not args.no_curve, acdc_batch=acdc_batch(args, bundle.device))
    name = source.get("name") or re.sub(r"[^\w-]+", "_", source.get("subject", "fact"))
    out = Path(args.output or Path("circuits-out") / name)
    out.mkdir(parents=True, exist_ok=True)
    facts = result.test_facts
    view = layer_view(bundle, [f.prompt for f in facts], [f.subject for f in facts], [f.object for f in facts],
                      set(result.circuit.nodes), contexts=[f.context for f in facts])
    files = ["circuit.json", "report.json", "circuit.svg", "circuit.png", "circuit.dot", "layers.png"]
    report = dict(result.report, source=source, model=bundle.provenance, layers=view,
                  test_facts=facts_as_dicts(facts), command=" ".join(["python -m bench", *sys.argv[1:]]),
                  files=files)
    variant = setting_variant(args)
    report["setting"]["name"] = args.setting + (f" (variant: {', '.join(variant)})" if variant else "")
    report["seconds"]["total"] = time.perf_counter() - started
    result.circuit.save(out / "circuit.json")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    size = (f"threshold {setting.acdc_threshold:g}, {len(result.circuit.edges)} edges" if setting.method == "acdc"
            else f"top {len(result.circuit.edges)} edges")
    title = f"{bundle.name}: {name}, {setting.method}, {setting.ablation} ablation, {size}"
    (out / "circuit.dot").write_text(circuit_dot(result.circuit.edges, title))
    draw_circuit(result.circuit.edges, [out / "circuit.svg", out / "circuit.png"], title)
    plot_layers(view, out / "layers.png", f"{bundle.name}: {name} (test prompts: {view['n_prompts']})")
    print(f"wrote {out}/{', '.join(files)}")
    print(summary_line(name, report))
    return 0


def summary_line(name: str, report: dict[str, Any]) -> str:
    s = report["setting"]
    parts = [f"{name} ({s['method']}, {s['ablation']} ablation, {s['metric']}, {s['graph']} graph, "
             f"{s['shots']} shots): circuit of {report['circuit']['n_edges']} edges"]
    for split in ("validation", "test"):
        t = report["hit_at_10"][split]
        parts.append(f"{split} ({t['n_prompts']} prompts) Hit@10 full {t['full_model']:.3f}, circuit "
                     f"{t['circuit']:.3f}, random {t['random_circuit']:.3f}, faithfulness "
                     f"{report['faithfulness'][split]['faithfulness']:.3f}")
    if "faithfulness_curve" in report:
        parts.append(f"CPR {report['faithfulness_curve']['cpr']:.3f}, CMD {report['faithfulness_curve']['cmd']:.3f}")
    return "; ".join(parts)
