"""AlphaEdit's preserved-key guarantee on a real model: ‖ΔW K₀‖ / (√N ‖ΔW‖) for MEMIT and AlphaEdit.

K₀ are the N corpus keys the key statistics C = K₀K₀ᵀ/N are built from, so the ratio is
sqrt(tr(ΔW C ΔWᵀ)) / ‖ΔW‖_F, computed from the cached C. AlphaEdit bounds it by sqrt(nullspace_threshold);
a ΔW with isotropic rows gives sqrt(mean eigenvalue of C), printed as `isotropic`.

    OMP_NUM_THREADS=1 python benchmarks/alphaedit_preservation.py --n 3 \
        --json benchmarks/results/alphaedit-preservation-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.data import load_dataset  # noqa: E402
from bench.run import restore  # noqa: E402
from editors.base import get_editor, load_hparams  # noqa: E402
from editors.keystats import second_moment  # noqa: E402
from lmview.arch import backup  # noqa: E402
from lmview.io import write_json  # noqa: E402
from lmview.models import load_model  # noqa: E402


def deltas(bundle, editor, cases) -> dict[int, torch.Tensor]:
    """ΔW per edited layer, with the weights restored bitwise afterwards."""
    saved = backup(bundle.model, editor.parameters_to_touch(cases))
    before = {layer: bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double().clone() for layer in editor.layers}
    editor.apply(cases)
    out = {layer: bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double() - w for layer, w in before.items()}
    restore(bundle.model, saved)
    editor.undo()
    return out


def preserved_ratio(delta: torch.Tensor, c: torch.Tensor) -> float:
    """sqrt(tr(ΔW C ΔWᵀ)) / ‖ΔW‖_F, with ΔW oriented so that it acts on keys (ΔW k)."""
    d = delta if delta.shape[1] == c.shape[0] else delta.T
    return float(torch.sqrt(torch.einsum("ij,jk,ik->", d, c.double(), d)) / d.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=3, help="cases, edited one at a time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bundle = load_model(args.model, args.device)
    cases = load_dataset("facts").cases[: args.n]
    results: dict = {"model": args.model, "device": str(bundle.device), "cases": [c.case_id for c in cases]}
    moments: dict[int, torch.Tensor] = {}
    for name in ("memit", "alphaedit"):
        hp, hp_file = load_hparams(name, bundle.name, bundle.arch.family)
        editor = get_editor(name)(bundle, hp)
        for layer in editor.layers:  # the same cached statistics for both editors (same layers and samples)
            moments.setdefault(layer, second_moment(bundle, layer, n_samples=hp["mom2_n_samples"],
                                                    max_len=hp["mom2_max_len"]))
        per_case = [{str(layer): preserved_ratio(d, moments[layer]) for layer, d in deltas(bundle, editor, [case]).items()}
                    for case in cases]
        results[name] = {"hparams_file": Path(hp_file).relative_to(REPO).as_posix(), "per_case": per_case}
        if name == "alphaedit":
            results["alphaedit_bound"] = hp["nullspace_threshold"] ** 0.5
    results["isotropic"] = {str(layer): float(torch.linalg.eigvalsh(c.double()).mean().sqrt())
                            for layer, c in sorted(moments.items())}
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
