"""The cost of ACDC (circuits/acdc.py) on a real model, measured on a prefix of a run and extrapolated.

On KC's split of a relation (known facts, the validation prompts in one batch, zero ablation, match-nll), it
times ACDC's forward passes in two states of a run:
- start: the first `--forwards` tests of the first receiver (the logits), nothing else removed yet;
- end: `--forwards` tests of layer-0 receivers' edges, with every edge into a receiver of a later layer removed
  (the most patching a forward pass of the run can do).
Each forward is timed in wall-clock and in this process's CPU seconds. The run's forward passes are at most
1 + (edges) + (q/k/v receivers): every edge tested once, every q/k/v receiver tested whole once; fewer when
nodes are dropped. The estimate multiplies that bound by the mean of the two states' times per forward.

    OMP_NUM_THREADS=2 python benchmarks/acdc_cost.py --model smollm2-135m \
        --relation country_capital_city --forwards 6 [--speculate 16] [--device cuda] [--json OUT]

With --speculate k it also times forward passes of k speculative tests at once (`bench circuit --acdc-batch k`),
in both states, and states the time per test; that estimate assumes no test is discarded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lre import load_relation  # noqa: E402
from bench.relation_circuits import kc_split, kc_template, make_fact, pair_rows  # noqa: E402
from circuits.acdc import ACDC_THRESHOLD, acdc, cumulative_removals, incoming_order  # noqa: E402
from circuits.relation import KC_SETTING, ScoringSet, batches, graph_of  # noqa: E402
from lmview.models import load_model  # noqa: E402


class Enough(Exception):
    pass


def timed_measure(scoring: ScoringSet, limit: int, times: list[tuple[float, float]]):
    def measure(keep: torch.Tensor) -> float:
        if len(times) >= limit:
            raise Enough
        wall, cpu = time.perf_counter(), time.process_time()
        value = float(scoring.with_edges(keep).value.mean())
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        return value

    return measure


def end_state_times(scoring: ScoringSet, n: int) -> list[tuple[float, float]]:
    """Forwards that test the one incoming edge (from the input) of each of the first `n` layer-0 receivers,
    every edge into a later layer's receiver removed."""
    graph = scoring.graph
    keep = graph.edge_mask.clone()
    keep[:, graph.receivers_per_layer:] = False  # receivers of layers 1.. and the logits
    times = []
    for receiver in range(min(n, graph.receivers_per_layer)):
        trial = keep.clone()
        trial[incoming_order(graph, receiver)[0], receiver] = False
        wall, cpu = time.perf_counter(), time.process_time()
        scoring.with_edges(trial)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def speculative_times(scoring: ScoringSet, k: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per state, the time of one forward pass of `k` speculative tests (`ScoringSet.mean_values`), `repeats`
    times: the first k edges into the logits removed one more per test (start), and with every edge into a
    later layer removed, one more layer-0 receiver's input edge per test (end)."""
    graph = scoring.graph
    start_keep, end_keep = graph.edge_mask.clone(), graph.edge_mask.clone()
    end_keep[:, graph.receivers_per_layer:] = False
    start_trials = cumulative_removals(start_keep, [(u, graph.logits_index)
                                                    for u in incoming_order(graph, graph.logits_index)[:k]])
    end_trials = cumulative_removals(end_keep, [(incoming_order(graph, r)[0], r)
                                                for r in range(min(k, graph.receivers_per_layer))])
    times: dict[str, list[tuple[float, float]]] = {}
    for state, trials in (("start", start_trials), ("end", end_trials)):
        times[state] = []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            scoring.mean_values(trials)
            times[state].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--relation", default="country_capital_city")
    parser.add_argument("--forwards", type=int, default=10, help="timed forward passes per state")
    parser.add_argument("--speculate", type=int, default=0,
                        help="also time passes of this many speculative tests (bench circuit --acdc-batch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    bundle = load_model(args.model, device=args.device)
    relation = load_relation(args.relation)
    template = kc_template(relation)
    facts = [make_fact(template, s, o, relation.samples, 0, 0) for s, o in relation.samples]
    split = kc_split(bundle, relation.name, facts)
    rows, _ = pair_rows(bundle.tokenizer, split.validation, relation.samples, 0, need_partner=False)
    scoring = ScoringSet(bundle, graph_of(bundle.arch), batches(rows, bundle.tokenizer, bundle.device, chunk=len(rows)),
                         KC_SETTING)
    graph = scoring.graph
    start_times: list[tuple[float, float]] = []
    try:  # the first receiver is the logits: its incoming edges come first
        acdc(timed_measure(scoring, args.forwards + 1, start_times), graph, ACDC_THRESHOLD, progress=False)
    except Enough:
        pass
    end_times = end_state_times(scoring, args.forwards)
    qkv_receivers = graph.n_layers * (graph.n_heads + 2 * graph.n_kv_heads)
    bound = 1 + graph.n_edges + qkv_receivers
    mean = {key: (sum(t[i] for t in start_times) / len(start_times) + sum(t[i] for t in end_times) / len(end_times)) / 2
            for i, key in enumerate(("wall", "cpu"))}
    result = {"model": args.model, "relation": args.relation, "device": args.device,
              "validation_prompts": len(rows), "prompt_tokens": int(scoring.chunks[0].clean_ids.shape[1]),
              "n_edges": graph.n_edges, "qkv_receivers": qkv_receivers, "forward_bound": bound,
              "start_state_seconds": [{"wall": w, "cpu": c} for w, c in start_times],
              "end_state_seconds": [{"wall": w, "cpu": c} for w, c in end_times],
              "mean_seconds_per_forward": mean,
              "estimate_hours_at_the_bound": {k: v * bound / 3600 for k, v in mean.items()},
              "torch_threads": torch.get_num_threads()}
    if args.speculate > 1:
        batched = speculative_times(scoring, args.speculate, max(1, args.forwards // 3))
        per_test = {key: sum(sum(t[i] for t in ts) / len(ts) for ts in batched.values()) / 2 / args.speculate
                    for i, key in enumerate(("wall", "cpu"))}
        result["speculative"] = {"tests_per_pass": args.speculate,
                                 "pass_seconds": {state: [{"wall": w, "cpu": c} for w, c in ts]
                                                  for state, ts in batched.items()},
                                 "mean_seconds_per_test": per_test,
                                 "estimate_hours_at_the_bound": {k: v * bound / 3600 for k, v in per_test.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
