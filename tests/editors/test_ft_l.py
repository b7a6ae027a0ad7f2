"""FT-L as ROME's baseline (kmeng01/rome baselines/ft/ft_main.py), checked by hand on tiny-gpt2."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from editors.base import HPARAMS_DIR, EditorError, get_editor, load_hparams
from editors.ft import prompt_last_nll
from lmview.arch import parameter
from lmview.case import EditCase
from lmview.models import load_model
from lmview.tokens import build_batch, prompt_ids, target_ids

pytestmark = pytest.mark.usefixtures("one_thread", "cache")

CASE = EditCase(case_id="f-1", relation="r", subject="France", prompt="The capital of {} is", target_true="Paris",
                target_new="New Zealand", paraphrases=(), neighborhood=(("The capital of Spain is", "Madrid"),))
OTHER = EditCase(case_id="f-2", relation="r", subject="the Eiffel Tower", prompt="{} stands in the city of",
                 target_true="Paris", target_new="Rome", paraphrases=(), neighborhood=(("x", "y"),))

# kmeng01/rome hparams/FT/*_constr.json, transcribed (method keys; the module templates are the family's)
ROME_FT = {
    "gpt2-xl": {"layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0,
                "norm_constraint": 5e-4},
    "gpt2-medium": {"layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0,
                    "norm_constraint": 2e-3},
}


def hand_loss(model, tok, prompt: str, target: str) -> torch.Tensor:
    """-(1/J) Σ_j log softmax(logits at the prompt's last token)[o_j], one unpadded forward pass."""
    ids = torch.tensor([prompt_ids(tok, prompt)])
    logits = model(input_ids=ids).logits[0, -1].float()
    logp = logits.log_softmax(-1)
    return -torch.stack([logp[t] for t in target_ids(tok, target)]).mean()


def test_prompt_last_loss_matches_a_hand_computation() -> None:
    bundle = load_model("tiny-gpt2", "cpu")
    tok, model = bundle.tokenizer, bundle.model
    assert len(target_ids(tok, CASE.target_new)) > 1
    batch = build_batch(tok, [CASE.rewrite_prompt, OTHER.rewrite_prompt], [CASE.target_new, OTHER.target_new])
    with torch.no_grad():
        ours = prompt_last_nll(model, batch)
        expected = (hand_loss(model, tok, CASE.rewrite_prompt, CASE.target_new)
                    + hand_loss(model, tok, OTHER.rewrite_prompt, OTHER.target_new)) / 2
        teacher_forced_differs = hand_loss(model, tok, CASE.rewrite_prompt + " New", "Zealand")
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)
    assert float(teacher_forced_differs) != pytest.approx(float(expected), rel=1e-3)


def test_one_epoch_is_one_adam_step_on_weight_and_bias() -> None:
    """Adam's first step moves every trained entry by lr·g/(|g|+1e-8); ROME trains c_proj's weight and bias."""
    bundle = load_model("tiny-gpt2", "cpu")
    model, tok = bundle.model, bundle.tokenizer
    hp = {"layers": [0], "num_steps": 1, "lr": 1e-3, "norm_constraint": False}
    editor = get_editor("ft-l")(bundle, hp)
    names = editor.parameters_to_touch([CASE])
    assert names == ["transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"]
    params = [parameter(model, n) for n in names]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(hand_loss(model, tok, CASE.rewrite_prompt, CASE.target_new), params)
    for p in params:
        p.requires_grad_(False)
    outcome = editor.apply([CASE])
    try:
        for p, p0, g in zip(params, before, grads):
            expected = -hp["lr"] * g / (g.abs() + 1e-8)
            assert torch.allclose(p.detach() - p0, expected, atol=1e-7, rtol=1e-3)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, before):
                p.copy_(p0)
    assert outcome.stats["epochs"] == 1 and outcome.layers == [0]


def test_norm_constraint_bounds_every_trained_parameter() -> None:
    bundle = load_model("tiny-llama", "cpu")
    hp, _ = load_hparams("ft-l", bundle.name, bundle.arch.family)
    editor = get_editor("ft-l")(bundle, {**hp, "lr": 1e-2})
    names = editor.parameters_to_touch([CASE])
    assert names == ["model.layers.0.mlp.down_proj.weight"]  # Llama's down_proj has no bias
    before = {n: parameter(bundle.model, n).detach().clone() for n in names}
    outcome = editor.apply([CASE, OTHER])  # both cases fitted jointly, in one chunk (ROME's batch_size 128)
    try:
        for n in names:
            change = (parameter(bundle.model, n) - before[n]).abs().max()
            assert 0 < change <= hp["norm_constraint"] + 1e-7
    finally:
        with torch.no_grad():
            for n in names:
                parameter(bundle.model, n).copy_(before[n])
    assert outcome.stats["loss_final"] < outcome.stats["loss_initial"] and outcome.stats["n_cases"] == 2


@pytest.mark.parametrize("model", sorted(ROME_FT))
def test_published_ft_l_files_match_rome(model: str) -> None:
    data = yaml.safe_load((HPARAMS_DIR / "ft-l" / f"{model}.yaml").read_text())
    assert data == ROME_FT[model], json.dumps(data)


@pytest.mark.parametrize("bad, match", [({"layers": []}, "non-empty"), ({"layers": [99]}, "0..3"),
                                        ({"layers": [0], "objective_optimization": "target_new"}, "ft-m"),
                                        ({"layers": [0], "kl_factor": 0.5}, "kl_factor"),
                                        ({"layers": [0], "norm_constraint": -1}, "norm_constraint"),
                                        ({"layers": [0], "num_steps": 0}, "num_steps")])
def test_bad_hyperparameters_are_one_line_errors(bad: dict, match: str) -> None:
    bundle = load_model("tiny-gpt2", "cpu")
    with pytest.raises(EditorError, match=match):
        get_editor("ft-l")(bundle, bad)
