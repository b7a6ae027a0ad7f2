"""Side-by-side run of editors/wise.py against EasyEdit's WISE (`easyeditor/models/wise/WISE.py`): one edit on
tiny-llama, the same request, the same gradient mask, and the side-memory update of each compared.

EasyEdit's modules are imported from a checkout (`--easyedit`, the repository root) under a private package
name whose parent packages are empty module objects, so only WISE.py, its utils.py and its merge/ package run
(the multimodal helpers its utils.py imports are stubbed: the text path never calls them). Nothing of the
reference is copied here.

Both sides get: one context template (the bare prompt; `context_template_length_params: [[5, 0]]` here,
EasyEdit's template cache set to ['{}']), one out-of-scope text x_i of the edit row's token length (so that
EasyEdit's batch has no padding), the seed-0 mask of editors/wise.py (EasyEdit draws its own from numpy's global
generator; it is replaced), and the shipped tiny-llama hyperparameters with `n_iter` steps. Three EasyEdit runs:

1. as shipped;
2. with its activation score taken without the model's activation function (`hidden_act` set to identity
   after construction): the paper's Δ_act, as editors/wise.py computes it;
3. as 2, and with its edit loss averaged over the target tokens only (its `_cal_ft_loss` also counts one
   prompt position, whose label is ignored, in each row's denominator).

Reproduce (CPU):

    git clone https://github.com/zjunlp/EasyEdit /tmp/ref/EasyEdit      # commit 14cea82 was used
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_wise.py --easyedit /tmp/ref/EasyEdit \
        --json benchmarks/results/reference-wise-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from editors.base import get_editor, load_hparams
from lmview.case import EditCase
from lmview.models import load_model
from lmview.tokens import prompt_ids, target_ids

PROMPT_TEMPLATE, SUBJECT, TARGET = "The capital of {} is", "France", "art"
LAYER = 2
PRIVATE = "_ref_easyeditor"


def import_reference(root: Path) -> types.ModuleType:
    """EasyEdit's WISE.py without running the package's __init__ files."""
    wise_dir = root / "easyeditor" / "models" / "wise"
    if not (wise_dir / "WISE.py").is_file():
        raise SystemExit(f"error: {wise_dir / 'WISE.py'} not found; --easyedit takes the EasyEdit repository root")
    for name, path in ((PRIVATE, None), (f"{PRIVATE}.models", None), (f"{PRIVATE}.models.wise", wise_dir),
                       (f"{PRIVATE}.util", None)):
        module = types.ModuleType(name)
        module.__path__ = [str(path)] if path else []
        sys.modules[name] = module
    stub = types.ModuleType(f"{PRIVATE}.util.vl_utils")
    for attr in ("build_target_labels", "count_media_items", "get_batch_file_type", "normalize_multimodal_batch",
                 "prepend_qwen_vl_image_tokens_if_missing"):
        setattr(stub, attr, None)
    sys.modules[stub.__name__] = stub
    return importlib.import_module(f"{PRIVATE}.models.wise.WISE")


def out_of_scope_text(tokenizer: Any, length: int) -> str:
    """A text of exactly `length` tokens (with the tokenizer's special tokens)."""
    words = "Rivers run through old cities where people speak many languages about history and music"
    for end in range(1, len(words) + 1):
        if len(tokenizer(words[:end].strip()).input_ids) == length:
            return words[:end].strip()
    raise SystemExit("error: no out-of-scope text of the edit row's length")


def ours(hp: dict[str, Any], corpus: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(ΔW in the Linear layout [d_model, d_mlp], the mask in that layout, the in-scope score)."""
    bundle = load_model("tiny-llama", "cpu")
    editor = get_editor("wise")(bundle, {**hp, "out_of_scope_corpus": str(corpus)})
    case = EditCase("x", "r", SUBJECT, PROMPT_TEMPLATE, "Paris", TARGET, (), ())
    editor.apply([case])
    mem = editor.memories
    out = (mem.shard - mem.main).T.clone(), mem.mask.T.contiguous(), mem.min_score
    editor.undo()
    return out


def reference(wise: types.ModuleType, hp: dict[str, Any], loc: str, mask: torch.Tensor, identity_act: bool,
              target_only_loss: bool) -> dict[str, Any]:
    bundle = load_model("tiny-llama", "cpu")
    utils = sys.modules[f"{PRIVATE}.models.wise.utils"]
    margin = hp["act_margin"]
    cfg = SimpleNamespace(inner_params=[f"model.layers[{LAYER}].mlp.down_proj.weight"], sequential_edit=True,
                          retrieve=False, replay=False, model_name="tiny-llama", save_freq=hp["save_freq"],
                          merge_freq=hp["merge_freq"], mask_ratio=hp["mask_ratio"], n_iter=hp["n_iter"],
                          edit_lr=hp["edit_lr"], norm_constraint=float(hp["norm_constraint"]), alpha=margin[0],
                          beta=margin[1], gamma=margin[2], act_ratio=hp["act_ratio"], merge_alg=hp["merge_alg"],
                          densities=hp["densities"], weights=hp["weights"], objective_optimization="only_label",
                          batch_size=1, device="cpu")
    saved = wise.WISEAdapter.generate_activation_mask, wise.WISE._cal_ft_loss
    wise.WISEAdapter.generate_activation_mask = lambda self, _ratio: setattr(self, "weight_mask", mask.reshape(-1))
    if target_only_loss:
        wise.WISE._cal_ft_loss = target_only_ft_loss
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            editor = wise.WISE(cfg, bundle.model, "cpu")
        if identity_act:
            cfg.hidden_act = "linear"
        request = dict(prompt=PROMPT_TEMPLATE.format(SUBJECT), target_new=TARGET, loc_prompt=loc)
        tokens, act_mask, deact_mask = utils.tokenize([request], bundle.tokenizer, "cpu", context_templates=["{}"],
                                                      hparams=cfg)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            editor.edit(cfg, tokens, act_mask=act_mask, deact_mask=deact_mask)
        adapter = editor.get_adapter_layer()
        losses = [line for line in printed.getvalue().splitlines() if line.startswith("loss")]
        return dict(delta=(adapter.new_weight - adapter.original_layer.weight).detach(), steps=len(losses),
                    first_loss=losses[0], last_loss=losses[-1], in_scope_score=adapter.editing_mean_act.min_act(),
                    edit_row=tokens["input_ids"][0].tolist())
    finally:
        wise.WISEAdapter.generate_activation_mask, wise.WISE._cal_ft_loss = saved


def target_only_ft_loss(self: Any, tokens: dict[str, torch.Tensor], _last: torch.Tensor) -> torch.Tensor:
    """EasyEdit's edit loss (every row but the last, shifted labels) averaged over the target tokens only."""
    logits = self.model(**tokens).logits[:-1, :-1]
    labels = tokens["labels"][:-1, 1:]
    keep = labels != -100
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            reduction="none", ignore_index=-100).view(labels.shape)
    return ((nll * keep).sum(1) / keep.sum(1)).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--easyedit", type=Path, required=True, help="EasyEdit repository root")
    parser.add_argument("--n-iter", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wise = import_reference(args.easyedit)
    tokenizer = load_model("tiny-llama", "cpu").tokenizer
    prompt = PROMPT_TEMPLATE.format(SUBJECT)
    edit_row = prompt_ids(tokenizer, prompt) + target_ids(tokenizer, TARGET)
    loc = out_of_scope_text(tokenizer, len(edit_row))
    corpus = Path(args.json.parent if args.json else Path.cwd()) / ".reference_wise_x_i.txt"
    corpus.write_text(loc)
    hp, _ = load_hparams("wise", "tiny-llama", "llama")
    hp = {**hp, "layers": [LAYER], "n_iter": args.n_iter, "context_template_length_params": [[5, 0]],
          "out_of_scope_tokens": len(edit_row), "seed": 0}
    try:
        our_delta, mask, our_score = ours(hp, corpus)
    finally:
        corpus.unlink()
    report: dict[str, Any] = {"model": "tiny-llama", "layer": LAYER, "n_iter": args.n_iter,
                              "our_update_norm": float(our_delta.norm()), "our_in_scope_score": our_score, "runs": {}}
    for label, identity_act, target_only in (("as shipped", False, False),
                                             ("score without the activation function", True, False),
                                             ("and edit loss over the target tokens", True, True)):
        ref = reference(wise, hp, loc, mask, identity_act, target_only)
        if ref["edit_row"] != edit_row:
            raise SystemExit("error: EasyEdit tokenised the edit row differently")
        diff = ref["delta"] - our_delta
        report["runs"][label] = dict(steps=ref["steps"], first_loss=ref["first_loss"], last_loss=ref["last_loss"],
                                     max_abs_difference=float(diff.abs().max()),
                                     relative_frobenius=float(diff.norm() / our_delta.norm()),
                                     reference_in_scope_score=ref["in_scope_score"])
        print(f"{label}: max |ΔW_EasyEdit − ΔW_ours| {report['runs'][label]['max_abs_difference']:.3g}, "
              f"relative {report['runs'][label]['relative_frobenius']:.3g} ({ref['steps']} steps; {ref['last_loss']})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
