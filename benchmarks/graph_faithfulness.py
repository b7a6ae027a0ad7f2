"""In-sample faithfulness of one fact's per-case circuit at several sizes, on the ungrouped and the grouped graph.

The circuit is built as `bench run` builds the pre-edit one: prompt set A of the case, corrupting subjects
that share neither answer (bench/corrupt.py), EAP with corrupted patching and the log-prob metric, top-n
edges by |score|, with and without EAP-IG's pruning.

    python benchmarks/graph_faithfulness.py --case capital-france --sizes 300 3000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corrupt import CorruptionPool, answer_check, prompt_pairs, prompt_sets  # noqa: E402
from bench.data import load_dataset  # noqa: E402
from circuits.circuit import discover  # noqa: E402
from circuits.graph import GRAPHS, Graph  # noqa: E402
from lmview.models import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--case", default="capital-france")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 3000])
    args = parser.parse_args()
    bundle = load_model(args.model, "cpu")
    data = load_dataset("facts")
    case = next(c for c in data.cases if c.case_id == args.case)
    check = answer_check(bundle.model, bundle.tokenizer, (case.target_true, case.target_new), bundle.device)
    pairs = prompt_pairs(bundle.tokenizer, case, prompt_sets(case)[0], CorruptionPool.from_cases(data.cases),
                         accept=check)
    batch = pairs.batch(bundle.tokenizer, case.target_true, bundle.device)
    print(f"{case.case_id}: corrupting subjects {pairs.swapped}")
    print("| graph | edges | top-n | edges after pruning | faithfulness (pruned) | faithfulness (unpruned) |")
    print("|---|---|---|---|---|---|")
    for kind in GRAPHS:
        n_edges = Graph.of(bundle.arch, kind).n_edges
        for n in args.sizes:
            pruned = discover(bundle.bridge(), bundle.model, bundle.arch, batch, case.target_true, top_n=n, graph=kind)
            whole = discover(bundle.bridge(), bundle.model, bundle.arch, batch, case.target_true, top_n=n, graph=kind,
                             prune_dead=False)
            print(f"| {kind} | {n_edges} | {n} | {len(pruned.edges)} | {pruned.metrics['faithfulness']:.3f} | "
                  f"{whole.metrics['faithfulness']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
