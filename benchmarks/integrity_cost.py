"""Cost of the whole-model integrity check (every parameter and buffer hashed, every module's hooks
counted) next to one edit, on the same model and device.

    OMP_NUM_THREADS=1 python -m benchmarks.integrity_cost --model smollm2-135m --editor rome \
        --mom2-n-samples 100 --output benchmarks/results/integrity-cost-cpu.json
"""

from __future__ import annotations

import argparse
import logging
import json
import statistics
import time
from pathlib import Path

import torch

from bench.data import load_dataset
from bench.integrity import ModelGuard, fingerprints
from bench.run import restore, sync, touched_parameters
from editors.base import get_editor, load_hparams
from lmview.arch import backup
from lmview.models import load_model


def timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--editor", default="rome")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=3, help="edits timed (the first, which may build caches, is dropped)")
    parser.add_argument("--checks", type=int, default=5, help="integrity checks timed")
    parser.add_argument("--mom2-n-samples", type=int, default=None,
                        help="key-statistics texts (a cached smaller sample saves the one-off statistics pass)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    bundle = load_model(args.model, args.device)
    hparams, _ = load_hparams(args.editor, args.model, bundle.arch.family)
    if args.mom2_n_samples is not None:
        hparams["mom2_n_samples"] = args.mom2_n_samples
    editor = get_editor(args.editor)(bundle, hparams)
    cases = load_dataset("facts").cases[: args.cases + 1]
    guard = ModelGuard.of(bundle.model, args.editor)
    edits = []
    for case in cases:
        saved = backup(bundle.model, touched_parameters(editor, [case]))
        edits.append(timed(lambda: editor.apply([case]), bundle.device))
        restore(bundle.model, saved)
        editor.undo()
    checks = [timed(lambda: guard.verify(), bundle.device) for _ in range(args.checks)]
    n_bytes = sum(t.numel() * t.element_size() for t in bundle.model.state_dict().values())
    result = {
        "command": "python -m benchmarks.integrity_cost " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "model": args.model, "editor": args.editor, "device": str(bundle.device),
        "torch_threads": torch.get_num_threads(), "n_tensors": len(fingerprints(bundle.model)),
        "model_megabytes": round(n_bytes / 2**20, 1),
        "seconds_check_median": round(statistics.median(checks), 3),
        "seconds_edit_median": round(statistics.median(edits[1:] or edits), 3),
    }
    result["check_over_edit"] = round(result["seconds_check_median"] / result["seconds_edit_median"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
