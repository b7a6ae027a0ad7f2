"""`python -m bench circuit-diff A.json B.json`: two circuits on one figure, kept/lost/new edges coloured.

A and B are circuit.json files (circuits.circuit.Circuit), e.g. a case's `<case>.pre.json` and
`<case>.post.json` from a run folder. Writes FILE (format from its suffix: .svg, .png or .pdf) and, always,
FILE with the suffix .json: the kept, lost and new edge lists and the overlap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "circuit-diff"
HELP = "draw two circuits (circuit.json files) on one figure: kept, lost and new edges"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("before", help="the first circuit.json (e.g. the pre-edit circuit)")
    parser.add_argument("after", help="the second circuit.json (e.g. the post-edit circuit)")
    parser.add_argument("--output", default=None, help="figure to write (.svg, .png or .pdf; default <after>-diff.svg)")


def read_circuit(path: str):
    from circuits.circuit import Circuit

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"circuit file '{path}' does not exist")
    try:
        circuit = Circuit.from_json(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: not a circuit.json file ({type(exc).__name__})") from None
    edges = circuit.edges
    if not isinstance(edges, dict) or not all(isinstance(v, (int, float)) for v in edges.values()):
        raise ValueError(f"{path}: not a circuit.json file ('edges' is not a mapping of edge names to scores)")
    return circuit


def main(args: argparse.Namespace) -> int:
    from circuits.circuit import overlap
    from circuits.draw import diff_edges, draw_diff

    before, after = read_circuit(args.before), read_circuit(args.after)
    output = Path(args.output) if args.output else Path(args.after).with_name(Path(args.after).stem + "-diff.svg")
    if output.suffix not in (".svg", ".png", ".pdf"):
        raise ValueError("--output must end in .svg, .png or .pdf")
    output.parent.mkdir(parents=True, exist_ok=True)
    groups = diff_edges(before.edges, after.edges)
    if before.graph != after.graph and before.n_graph_edges != after.n_graph_edges:
        raise ValueError(f"the circuits are on different graphs ({before.graph}, {after.graph}): their edges "
                         "do not compare")
    summary = {"before": args.before, "after": args.after, "graph": after.graph,
               **{k: len(v) for k, v in groups.items()},
               **overlap(before, after), "edges": groups}
    summary_path = output.with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=2))
    title = f"{Path(args.before).name} (before) vs {Path(args.after).name} (after)"
    draw_diff(before.edges, after.edges, [output], title)
    print(f"kept {len(groups['kept'])}, lost {len(groups['lost'])}, new {len(groups['new'])} edges; "
          f"edge Jaccard {summary['edge_jaccard']:.3f}")
    print(f"wrote {summary_path} and {output}")
    return 0
