"""FT-M, KN and GRACE on the tiny random-init models (fast), each checked against an independent computation."""

from __future__ import annotations


import pytest
import torch

from bench.run import RunConfig, all_finite, run_case
from bench.scoring import case_target_nll, counterfact_scores
from editors.base import get_editor, load_hparams
from editors.ft import target_nll
from editors.grace import Codebook
from editors.kn import coarse_neurons, integrated_gradients, refine
from lmview.case import EditCase
from lmview.models import ModelBundle, load_model
from lmview.tokens import build_batch, next_token_logprobs, prompt_ids, target_ids
from tests.helpers import assert_bridge_predicts

pytestmark = pytest.mark.usefixtures("one_thread", "cache")


TINY = ["tiny-gpt2", "tiny-llama"]
POOL = ["France", "Chile", "Peru", "Kenya", "Nepal", "Norway", "Canada", "Brazil", "Mexico"]


def a_case(target_new: str = "London") -> EditCase:
    return EditCase(
        case_id="m-1", relation="country_capital", subject="France", prompt="The capital of {} is",
        target_true="Paris", target_new=target_new,
        paraphrases=("France's capital is", "The capital city of France is", "France has its capital in"),
        neighborhood=tuple((f"The capital of {c} is", a) for c, a in
                           [("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                            ("Egypt", "Cairo")]),
    )


def editor_for(name: str, bundle: ModelBundle, **overrides):
    hp, _ = load_hparams(name, bundle.name, bundle.arch.family)
    return get_editor(name)(bundle, {**hp, **overrides})


def snapshot(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in bundle.model.named_parameters()}


def changed(bundle: ModelBundle, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in bundle.model.named_parameters() if not torch.equal(p, before[n])}


@torch.no_grad()
def logits_of(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    return next_token_logprobs(bundle.model, bundle.tokenizer, prompts, bundle.device)


def unlikely_single_token_word(bundle: ModelBundle, prompt: str) -> str:
    """A word the tiny tokenizer encodes (with its leading space) as one token, the least likely after prompt."""
    words = [w for w in ("the", "of", "and", "is", "in", "capital", "city", "to", "art", "music", "old")
             if len(target_ids(bundle.tokenizer, w)) == 1]
    if not words:
        pytest.skip("no single-token word in the tiny tokenizer")
    lp = logits_of(bundle, [prompt])[0]
    return min(words, key=lambda w: float(lp[target_ids(bundle.tokenizer, w)[0]]))


# --- FT-M ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_ftm_loss_is_hf_cross_entropy_on_target_tokens_only(name: str) -> None:
    """Independent: HF's own shifted cross-entropy with the prompt labels set to -100."""
    bundle = load_model(name, "cpu")
    case = a_case()
    batch = build_batch(bundle.tokenizer, [case.rewrite_prompt], [case.target_new], "cpu")
    labels = batch.input_ids.clone()
    labels[0, : int(batch.prompt_len[0])] = -100
    with torch.no_grad():
        expected = bundle.model(input_ids=batch.input_ids, labels=labels).loss
        ours = target_nll(bundle.model, batch)
        # the prompt's own tokens carry no loss: a full-sequence loss differs
        full = bundle.model(input_ids=batch.input_ids, labels=batch.input_ids).loss
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, full, atol=1e-3)


@pytest.mark.parametrize("name", TINY)
def test_ftm_updates_only_the_rewrite_module(name: str) -> None:
    bundle = load_model(name, "cpu")
    editor = editor_for("ft-m", bundle)
    names = editor.parameters_to_touch([a_case()])
    layer = editor.layers[0]
    expected = {f"transformer.h.{layer}.mlp.c_proj.weight", f"transformer.h.{layer}.mlp.c_proj.bias"} \
        if bundle.arch.family == "gpt2" else {f"model.layers.{layer}.mlp.down_proj.weight"}
    assert set(names) == expected
    before = snapshot(bundle)
    outcome = editor.apply([a_case()])
    assert changed(bundle, before) == expected
    assert outcome.stats["loss_final"] < outcome.stats["loss_initial"]
    assert not any(p.requires_grad for p in bundle.model.parameters())


def test_ftm_norm_constraint_and_early_stop() -> None:
    bundle = load_model("tiny-llama", "cpu")
    before = snapshot(bundle)
    free = editor_for("ft-m", bundle, lr=1e-2, num_steps=5)
    free.apply([a_case()])
    name = free.parameters_to_touch([a_case()])[0]
    w = dict(bundle.model.named_parameters())[name]
    assert (w - before[name]).abs().max() > 1e-2  # unconstrained: Adam moves past eps
    with torch.no_grad():
        w.copy_(before[name])
    bound = editor_for("ft-m", bundle, lr=1e-2, num_steps=5, norm_constraint=1e-3)
    bound.apply([a_case()])
    assert (w - before[name]).abs().max() <= 1e-3 + 1e-7
    with torch.no_grad():
        w.copy_(before[name])
    stopped = editor_for("ft-m", bundle, early_stop_loss=1e6)  # EasyEdit: no step below the threshold
    assert stopped.apply([a_case()]).stats["epochs"] == 1 and not changed(bundle, before)


# --- KN: integrated gradients --------------------------------------------------------

def _tiny_mlp() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)


def _mlp_prob(w: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """f(a) = softmax(W tanh(a) + b)[2]: a smooth nonlinear 'answer probability'."""
    return (torch.tanh(rows) @ w.T + b[:5]).softmax(-1)[:, 2]


def test_integrated_gradients_equals_hand_riemann_sum() -> None:
    """Independent: the Riemann sum with the gradient written out by hand, one point at a time."""
    w, b = _tiny_mlp()
    a = torch.linspace(-1.5, 2.0, 7, dtype=torch.float64)
    m = 12
    ours = integrated_gradients(lambda rows: _mlp_prob(w, b, rows), a, steps=m, batch_size=5)
    total = torch.zeros(7, dtype=torch.float64)
    for k in range(1, m + 1):
        x = a * k / m
        p = (w @ torch.tanh(x) + b[:5]).softmax(-1)
        dp_dz = p[2] * ((torch.arange(5) == 2).double() - p)  # softmax Jacobian row 2
        total += (dp_dz @ w) * (1 - torch.tanh(x) ** 2)  # chain rule through W and tanh
    assert torch.allclose(ours, a * total / m, atol=1e-12)


def test_integrated_gradients_completeness() -> None:
    """Σ_i Attr_i → f(a) − f(0) as the number of steps grows (error O(1/m))."""
    w, b = _tiny_mlp()
    a = torch.linspace(-1.5, 2.0, 7, dtype=torch.float64)
    f = lambda rows: _mlp_prob(w, b, rows)  # noqa: E731
    gap = float(f(a[None]) - f(torch.zeros(1, 7, dtype=torch.float64)))
    errors = [abs(float(integrated_gradients(f, a, steps=m, batch_size=64).sum()) - gap) for m in (10, 100, 1000)]
    assert errors[1] < 0.2 * errors[0] and errors[2] < 0.2 * errors[1]  # the right Riemann sum's O(1/m)
    assert errors[2] < 2e-3 * abs(gap)


def test_coarse_and_refine_by_hand() -> None:
    scores = torch.tensor([[0.1, 1.0, 0.25], [0.19, 0.21, -3.0]])
    assert coarse_neurons(scores, 0.2) == {(0, 1), (0, 2), (1, 1)}
    prompts = [{(0, 1), (0, 2)}, {(0, 1)}, {(0, 1), (1, 1)}, {(1, 1)}]
    assert refine(prompts, 0.5) == [(0, 1), (1, 1)]  # 3/4 and 2/4 ≥ 0.5; (0, 2) only 1/4
    assert refine(prompts, 0.75) == [(0, 1)]


@pytest.mark.parametrize("name", TINY)
def test_kn_attribution_completeness_on_the_model(name: str) -> None:
    """Per layer, Σ Attr ≈ P(y | w̄) − P(y | layer's neurons zeroed at the last token), the latter from a plain hook."""
    bundle = load_model(name, "cpu")
    editor = editor_for("kn", bundle, steps=400, batch_size=100, layers=[1, 3])
    case = a_case()
    answer = target_ids(bundle.tokenizer, case.target_true)[0]
    scores = editor.attribution(case.rewrite_prompt, answer)
    ids = torch.tensor([prompt_ids(bundle.tokenizer, case.rewrite_prompt)])
    for row, layer in enumerate([1, 3]):
        def zero_last(_m, args):
            x = args[0].clone()
            x[:, -1] = 0
            return (x,)

        with torch.no_grad():
            p_full = bundle.model(input_ids=ids).logits[0, -1].softmax(-1)[answer]
            handle = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_pre_hook(zero_last)
            p_zero = bundle.model(input_ids=ids).logits[0, -1].softmax(-1)[answer]
            handle.remove()
        gap = float(p_full - p_zero)
        assert abs(float(scores[row].sum()) - gap) < 0.02 * abs(gap) + 1e-7


@pytest.mark.parametrize("name", TINY)
def test_kn_edit_writes_the_paper_update_into_value_slots(name: str) -> None:
    bundle = load_model(name, "cpu")
    editor = editor_for("kn", bundle, lambda_true=1.0, lambda_new=8.0)
    case = a_case()
    names = editor.parameters_to_touch([case])
    before = snapshot(bundle)
    outcome = editor.apply([case])
    neurons = editor.last_neurons
    assert neurons and outcome.layers == sorted({layer for layer, _ in neurons})
    assert changed(bundle, before) <= set(names)
    emb = bundle.model.get_output_embeddings().weight.detach()
    tok = bundle.tokenizer
    shift = 8.0 * emb[target_ids(tok, case.target_new)[0]] - emb[target_ids(tok, case.target_true)[0]]
    params = dict(bundle.model.named_parameters())
    for layer in editor.layers:
        name_w = bundle.arch.mlp_out_weight_name(layer)
        delta = params[name_w].detach() - before[name_w]
        delta = delta.T if bundle.arch.family == "gpt2" else delta  # [d_model, d_mlp]
        cols = [n for lay, n in neurons if lay == layer]
        expected = torch.zeros_like(delta)
        expected[:, cols] = shift[:, None]
        assert torch.allclose(delta, expected, atol=1e-5)


# --- GRACE -------------------------------------------------------------------------

def test_codebook_rules_by_hand() -> None:
    book = Codebook.empty(2, 1, torch.device("cpu"))
    assert book.insert(torch.tensor([0.0, 0.0]), torch.tensor([1.0]), "A", eps_init=1.0) == "added"
    assert book.insert(torch.tensor([5.0, 0.0]), torch.tensor([2.0]), "B", eps_init=1.0) == "added"  # 5 > 1 + 1
    assert book.insert(torch.tensor([0.0, 1.5]), torch.tensor([3.0]), "A", eps_init=1.0) == "expanded"
    assert float(book.radii[0]) == pytest.approx(1.5) and float(book.values[0, 0]) == 3.0
    assert book.insert(torch.tensor([5.0, 1.0]), torch.tensor([4.0]), "C", eps_init=1.0) == "split"
    assert float(book.radii[1]) == pytest.approx(0.5 - 1e-5) and float(book.radii[2]) == pytest.approx(0.5)
    hit, values = book.lookup(torch.tensor([[0.0, 1.4], [5.0, 0.45], [5.0, 0.55], [9.0, 9.0]]))
    assert hit.tolist() == [True, True, True, False]
    assert values[:3, 0].tolist() == [3.0, 2.0, 4.0]


def _grace_setup(bundle: ModelBundle):
    word = unlikely_single_token_word(bundle, a_case().rewrite_prompt)
    case = a_case(target_new=word)
    editor = editor_for("grace", bundle, n_iter=60, edit_lr=0.5)
    return editor, case, target_ids(bundle.tokenizer, word)[0]


def _unrelated(bundle: ModelBundle, editor, case: EditCase) -> list[str]:
    """Unrelated prompts, checked to be outside every deferral radius (the test's precondition)."""
    prompts = ["Music and art are", "Rivers run through old", "People speak many languages about"]
    keys = []
    handle = editor._module().register_forward_hook(lambda _m, a, _o: keys.append(a[0][0]))
    with torch.no_grad():
        for p in prompts:
            bundle.model(input_ids=torch.tensor([prompt_ids(bundle.tokenizer, p)]))
    handle.remove()
    dist, index = editor.codebook.nearest(torch.cat(keys))
    assert bool((dist > editor.codebook.radii[index]).all()), "precondition: unrelated keys inside a radius"
    return prompts


@pytest.mark.parametrize("name", TINY)
def test_grace_retrieves_edit_passes_others_and_undoes(name: str) -> None:
    bundle = load_model(name, "cpu")
    editor, case, new_id = _grace_setup(bundle)
    assert editor.parameters_to_touch([case]) == []
    before_params = snapshot(bundle)
    before_edit = logits_of(bundle, [case.rewrite_prompt])
    assert int(before_edit.argmax(-1)) != new_id
    outcome = editor.apply([case])
    assert outcome.stats["codebook_size"] == 1 and not changed(bundle, before_params)
    assert int(logits_of(bundle, [case.rewrite_prompt]).argmax(-1)) == new_id  # retrieved
    prompts = _unrelated(bundle, editor, case)
    editor.undo()
    plain = logits_of(bundle, prompts)
    assert torch.equal(logits_of(bundle, [case.rewrite_prompt]), before_edit)  # undo: exact
    editor.apply([case])
    assert torch.equal(logits_of(bundle, prompts), plain)  # unrelated inputs: bitwise identical
    editor.undo()
    assert editor.codebook is None and not editor._module()._forward_hooks


@pytest.mark.parametrize("boot_bridge_first", [True, False])
def test_grace_is_seen_through_the_bridge(boot_bridge_first: bool) -> None:
    bundle = load_model("tiny-llama", "cpu")
    if boot_bridge_first:
        bundle.bridge()
    editor, case, new_id = _grace_setup(bundle)
    editor.apply([case])
    assert_bridge_predicts(bundle, case.rewrite_prompt, new_id)
    editor.undo()
    ids = torch.tensor([prompt_ids(bundle.tokenizer, case.rewrite_prompt)])
    with torch.no_grad():
        assert int(bundle.bridge()(ids)[0, -1].argmax()) != new_id


def test_grace_through_run_case(tmp_path) -> None:
    """bench.run with an editor that touches no parameters: all_finite on [] and undo after the case."""
    bundle = load_model("tiny-gpt2", "cpu")
    editor, case, _ = _grace_setup(bundle)
    assert all_finite(bundle.model, [])
    record = run_case(bundle, editor, case, POOL, RunConfig(editor="grace", circuits=False), tmp_path)
    assert record["status"] == "ok" and record["post"]["efficacy_score"] == 1.0
    assert record["post"]["p_new"] > 3 * record["pre"]["p_new"]
    assert editor.codebook is None and not editor._module()._forward_hooks


def test_kn_easyedit_options_erase_the_prediction_and_skip_refining() -> None:
    bundle = load_model("tiny-gpt2", "cpu")
    case = a_case()
    with torch.no_grad():
        top = int(logits_of(bundle, [case.rewrite_prompt])[0].argmax())
    paper = editor_for("kn", bundle)
    easy = editor_for("kn", bundle, erase_token="prediction", refine=False, p=0.4)
    assert paper.erased_token(case) == target_ids(bundle.tokenizer, case.target_true)[0]
    assert easy.erased_token(case) == top
    seen: list[str] = []
    easy.attribution = lambda prompt, answer: seen.append(prompt) or torch.zeros(len(easy.layers), bundle.arch.d_mlp)
    easy.knowledge_neurons(case)
    assert seen == [case.rewrite_prompt]  # EasyEdit's refine: false attributes the rewrite prompt alone
