"""editors/ultraedit.py against the authors' own UltraEdit code, side by side on tiny-llama.

The authors' repository (XiaojieGu/UltraEdit) is not a package; give a checkout of it with --reference-dir. Their
`ULTRAEDIT.cache`, `predict_param_shifts` and `edit_model`, their `RunningMeanStd`, `Tracer` and batch collation
run on one copy of the model, editors/ultraedit.py on another, on the same two sequential batches of edits; the
script prints the relative Frobenius difference of every layer's ΔW and of the normalisation statistics.

    git clone https://github.com/XiaojieGu/UltraEdit /tmp/ultraedit-ref   # or any checkout of it
    OMP_NUM_THREADS=1 python benchmarks/ultraedit_reference.py --reference-dir /tmp/ultraedit-ref

`--variance reference` runs ours with the authors' variance update; `exact` (the default here) patches theirs
to the exact merge instead, and `published` compares each side as shipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace as NS

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from editors.base import get_editor, load_hparams  # noqa: E402
from lmview.case import EditCase  # noqa: E402
from lmview.models import load_model  # noqa: E402

LAYERS, LR, CHUNK = [1, 2], 1e-3, 2
PAIRS = [("France", "London"), ("Germany", "Rome"), ("Spain", "Oslo"), ("Italy", "Paris"), ("Japan", "Lima"),
         ("Brazil", "Cairo")]
CASES = [EditCase(case_id=f"c{i}", relation="P36", subject=s, prompt="The capital of {} is", target_true="Paris",
                  target_new=t, paraphrases=(), neighborhood=()) for i, (s, t) in enumerate(PAIRS)]
BATCHES = [CASES[:4], CASES[4:6] + CASES[:2]]  # multiples of CHUNK: see editors/ultraedit.py on ⌊n/chunk⌋


def exact_update(self, x: torch.Tensor) -> None:
    """RunningMeanStd.update with the exact merge (B − 1 times the chunk's unbiased variance)."""
    n = self.n + x.shape[0]
    delta = x.mean(0) - self.mean
    self.mean += x.shape[0] * delta / n
    self.var += (x.shape[0] - 1) * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
    self.std = (self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
    self.n = n


def import_reference(folder: Path) -> types.SimpleNamespace:
    for name in ("omegaconf", "nltk", "hydra"):  # imported by their modules, unused on this path
        stub = types.ModuleType(name)
        stub.DictConfig = dict
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, str(folder))
    import nets
    import util
    from data.base import BaseDataset
    from data.zsre import ZSREDataset
    from editor.ultraedit import ULTRAEDIT
    return types.SimpleNamespace(nets=nets, util=util, BaseDataset=BaseDataset, ZSREDataset=ZSREDataset,
                                 ULTRAEDIT=ULTRAEDIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", required=True, type=Path, help="a checkout of XiaojieGu/UltraEdit")
    parser.add_argument("--variance", choices=("exact", "reference", "published"), default="exact")
    args = parser.parse_args()
    if not (args.reference_dir / "editor" / "ultraedit.py").exists():
        print(f"error: {args.reference_dir} is not a checkout of XiaojieGu/UltraEdit (no editor/ultraedit.py)")
        return 2
    torch.set_num_threads(1)
    ref = import_reference(args.reference_dir)
    if args.variance == "exact":
        ref.nets.RunningMeanStd.update = exact_update

    ours_bundle, theirs_bundle = load_model("tiny-llama", "cpu"), load_model("tiny-llama", "cpu")
    hp, _ = load_hparams("ultraedit", "tiny-llama", "llama")
    ours = get_editor("ultraedit")(ours_bundle, {**hp, "layers": LAYERS, "lr": LR, "grad_batch_size": CHUNK,
                                                 "variance": "reference" if args.variance == "reference" else "exact"})
    model, modules = theirs_bundle.model, [f"model.layers.{layer}.mlp.down_proj" for layer in LAYERS]
    for p in model.parameters():
        p.requires_grad = False
    for m in modules:
        ref.util.get_module(model, m).weight.requires_grad = True
    cfg = NS(model=NS(edit_modules=modules, name="tiny"), num_seq=1, editor_device="cpu",
             editor=NS(cache_dir=tempfile.mkdtemp(), name="ultraedit", lr=LR, token="ans", batch_size=128),
             dataset=NS(name="x", n_edits=0, batch_size=CHUNK))
    theirs = ref.ULTRAEDIT.__new__(ref.ULTRAEDIT)  # their __init__ loads a tokenizer by path; set what it sets
    theirs.config, theirs.model = cfg, model
    shapes = {ref.util.get_shape(ref.util.get_module(model, m)) for m in modules}
    theirs.lifelong_normalizer = torch.nn.ModuleDict({str(s): ref.nets.RunningMeanStd(s[0] + s[1]) for s in shapes})
    data = NS(tok=theirs_bundle.tokenizer, config=NS(n_edits=0, batch_size=CHUNK), device="cpu")
    data.pad_tok_tuples = lambda rows: ref.BaseDataset.pad_tok_tuples(data, rows)

    worst = 0.0
    for index, cases in enumerate(BATCHES):
        data.config.n_edits = cfg.dataset.n_edits = len(cases)
        items = [{"edit_tuples": ref.ZSREDataset.tok_tuples(data, c.rewrite_prompt, c.target_new)} for c in cases]
        theirs.cache(ref.BaseDataset.collate_fn(data, items)["edit_tuples"])
        shifts = theirs.predict_param_shifts()
        theirs.edit_model(shifts, False)
        ours.apply(cases)
        for layer, module in zip(LAYERS, modules):
            a, b = ours.last_deltas[layer].float(), shifts[module].T.float()
            rel = float((a - b).norm() / b.norm())
            worst = max(worst, rel)
            print(f"batch {index} layer {layer}: ‖ΔW‖ ours {float(a.norm()):.6g}, theirs {float(b.norm()):.6g}; "
                  f"max |difference| {float((a - b).abs().max()):.3g}, relative {rel:.3g}")
        norm, stats = next(iter(theirs.lifelong_normalizer.values())), ours.statistics()
        std_rel = float(((stats.std.float() - norm.std).abs() / norm.std.clamp_min(1e-12)).max())
        print(f"  statistics: rows {stats.n} / {int(norm.n)}; max |mean difference| "
              f"{float((stats.mean.float() - norm.mean).abs().max()):.3g}; max relative std difference {std_rel:.3g}")
    print(f"variance {args.variance}: largest relative ΔW difference {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
