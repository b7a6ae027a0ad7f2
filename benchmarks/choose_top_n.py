"""Chooses the per-case circuit size (`bench run --top-n`) out of sample, on dev facts only.

For each dev case (the first case of each relation in the built-in facts' dev split, `facts:dev`), the
pre-edit circuit is built as `bench run` builds it: prompt set A, corrupting subjects that share neither
answer (bench/corrupt.py), EAP with corrupted patching and the log-prob metric on the ungrouped graph,
top-n edges by |score|, pruned. Each size is scored on the case's held-out prompt set B (out-of-sample
faithfulness, None when |clean - corrupted| < 0.1 nats, as in the run's records).

Rule: the smallest size of the grid whose median out-of-sample faithfulness over the dev cases (where it is
defined) is at least --target (0.8); with none, the largest size. The median, since single ratios can be
extreme; the mean is reported too.

    OMP_NUM_THREADS=1 python benchmarks/choose_top_n.py --sizes 300 1000 3000 10000 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corrupt import CorruptionPool, answer_check, prompt_pairs, prompt_sets  # noqa: E402
from bench.data import load_dataset  # noqa: E402
from circuits.attribute import attribute  # noqa: E402
from circuits.curve import reported_faithfulness  # noqa: E402
from circuits.evaluate import circuit_metrics  # noqa: E402
from circuits.graph import Graph  # noqa: E402
from circuits.selection import prune, top_edges  # noqa: E402
from lmview.io import write_json  # noqa: E402
from lmview.models import load_model  # noqa: E402


def first_case_per_relation(cases):
    seen: dict[str, object] = {}
    for case in cases:
        seen.setdefault(case.relation, case)
    return list(seen.values())


def chosen_size(sizes: list[int], medians: dict[int, float | None], target: float) -> int:
    """The smallest size whose median is at least target, else the largest size."""
    return next((n for n in sorted(sizes) if medians[n] is not None and medians[n] >= target), max(sizes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000, 10000])
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bundle = load_model(args.model, "cpu")
    dev = load_dataset("facts:dev")
    pool = CorruptionPool.from_cases(load_dataset("facts").cases + dev.cases)
    graph = Graph.of(bundle.arch, "ungrouped")
    bridge, tok = bundle.bridge(), bundle.tokenizer
    per_case: dict[str, dict] = {}
    start = time.perf_counter()
    for case in first_case_per_relation(dev.cases):
        set_a, set_b = prompt_sets(case)
        accept = answer_check(bundle.model, tok, (case.target_true, case.target_new), bundle.device)
        pairs_a = prompt_pairs(tok, case, set_a, pool, accept=accept)
        pairs_b = prompt_pairs(tok, case, set_b, pool, tag=":B", accept=accept, avoid=pairs_a.used)
        batch_a = pairs_a.batch(tok, case.target_true, bundle.device)
        batch_b = pairs_b.batch(tok, case.target_true, bundle.device)
        if batch_a is None or batch_b is None:
            per_case[case.case_id] = {"note": "no corrupted prompt pair in set A or set B"}
            print(f"{case.case_id}: skipped (no corrupted pair)", flush=True)
            continue
        scores = attribute(bridge, bundle.model, bundle.arch, graph, batch_a, "eap", metric="logprob")
        row = {}
        for n in args.sizes:
            keep = prune(top_edges(scores, graph, n), graph)
            metrics = circuit_metrics(bridge, bundle.model, bundle.arch, graph, batch_b, keep, "logprob")
            row[str(n)] = {"edges_after_pruning": int(keep.sum()), "oos_faithfulness": reported_faithfulness(metrics)}
        per_case[case.case_id] = row
        print(case.case_id, {n: v["oos_faithfulness"] for n, v in row.items()}, flush=True)
    means: dict[int, float | None] = {}
    medians: dict[int, float | None] = {}
    for n in args.sizes:
        values = [r[str(n)]["oos_faithfulness"] for r in per_case.values() if str(n) in r]
        values = [v for v in values if v is not None]
        means[n] = statistics.fmean(values) if values else None
        medians[n] = statistics.median(values) if values else None
    result = {
        "command": " ".join(["python", *sys.argv]), "model": args.model, "graph": graph.kind, "n_edges": graph.n_edges,
        "data": "facts:dev, first case of each relation", "target": args.target,
        "rule": f"smallest size whose median out-of-sample faithfulness over the dev cases is >= {args.target}",
        "median_oos_faithfulness": {str(n): m for n, m in medians.items()},
        "mean_oos_faithfulness": {str(n): m for n, m in means.items()},
        "n_cases_defined": {str(n): sum(1 for r in per_case.values()
                                        if str(n) in r and r[str(n)]["oos_faithfulness"] is not None)
                            for n in args.sizes},
        "chosen": chosen_size(args.sizes, medians, args.target), "per_case": per_case,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_case"}, indent=2))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
