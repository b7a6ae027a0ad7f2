"""`python -m bench circuit-export CIRCUIT.json --output FILE.json`: a circuit in the MIB circuit track's format.

CIRCUIT.json is a circuit file (circuits.circuit.Circuit) saved with its scores, i.e. with
`<name>.scores.pt` beside it: `bench run --save-scores` writes them for the pre- and post-edit circuits.
The output is EAP-IG's `Graph.to_json` layout that MIB's `run_evaluation.py --circuit_files` loads
(circuits/mib.py); MIB then selects its own top-k edges from the scores for CPR (signed) and CMD (|score|).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "circuit-export"
HELP = "write a circuit (with its saved scores) in MIB's circuit format, for MIB's own CPR/CMD evaluation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("circuit", help="a circuit.json saved with its scores (<name>.scores.pt beside it)")
    parser.add_argument("--output", default=None, help="MIB JSON to write (default <circuit>.mib.json)")


def main(args: argparse.Namespace) -> int:
    import torch

    from bench.cmd_circuit_diff import read_circuit
    from circuits.circuit import scores_path
    from circuits.mib import mib_graph

    circuit = read_circuit(args.circuit)
    saved = scores_path(Path(args.circuit))
    if not saved.is_file():
        raise ValueError(f"{saved} does not exist: MIB's format needs every edge's score "
                         "(write circuits with `bench run --save-scores`)")
    exported = mib_graph(circuit, torch.load(saved))
    output = Path(args.output) if args.output else Path(args.circuit).with_suffix(".mib.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(exported))
    kept = sum(e["in_graph"] for e in exported["edges"].values())
    print(f"wrote {output}: {len(exported['edges'])} edges ({kept} in the circuit), {circuit.graph} graph")
    return 0
