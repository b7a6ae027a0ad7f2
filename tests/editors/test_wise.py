"""WISE (editors/wise.py) on the tiny random-init models, against hand computations, the paper's equations and an
independent TIES implementation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import bench.run
from bench.cli import main
from editors.base import EditorError, get_editor, load_hparams
from editors.settings import HparamsError
from editors.wise import (UpperForward, activation_scores, gradient_mask, margin_loss, prefix_mean, row_mean,
                          ties_merge)
from lmview.case import EditCase
from lmview.models import ModelBundle, load_model
from lmview.tokens import next_token_logprobs, prompt_ids, target_ids
from tests.helpers import assert_bridge_predicts

pytestmark = pytest.mark.usefixtures("one_thread", "cache")

TINY = ["tiny-gpt2", "tiny-llama"]
UNRELATED = ["Music and art are", "Rivers run through old"]
SUBJECTS = [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Chile", "Santiago")]


def out_of_scope_corpus(folder: Path) -> str:
    path = folder / "x_i.txt"
    texts = [f"Old maps number {i} show rivers, hills and roads between small towns." for i in range(8)]
    path.write_text("\n\n".join(texts))
    return str(path)


def a_case(subject: str, true: str, new: str, index: int = 0) -> EditCase:
    return EditCase(case_id=f"w-{index}", relation="country_capital", subject=subject, prompt="The capital of {} is",
                    target_true=true, target_new=new, paraphrases=(f"{subject}'s capital is",),
                    neighborhood=(("The capital of Germany is", "Berlin"),))


def wise_for(bundle: ModelBundle, folder: Path, **overrides):
    hp, _ = load_hparams("wise", bundle.name, bundle.arch.family)
    return get_editor("wise")(bundle, {**hp, "out_of_scope_corpus": out_of_scope_corpus(folder), **overrides})


def single_token_word(bundle: ModelBundle, avoid: int = -1) -> str:
    words = [w for w in ("the", "of", "and", "is", "in", "art", "old", "city", "to")
             if len(target_ids(bundle.tokenizer, w)) == 1 and target_ids(bundle.tokenizer, w)[0] != avoid]
    if not words:
        pytest.skip("no single-token word in the tiny tokenizer")
    return words[0]


@torch.no_grad()
def next_logprobs(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    return next_token_logprobs(bundle.model, bundle.tokenizer, prompts, bundle.device)


@torch.no_grad()
def layer_acts(bundle: ModelBundle, editor, prompt: str | list[int]) -> torch.Tensor:
    """A(x) at the edited layer for one prompt (text or token ids), [1, T, d_mlp] (routing off)."""
    ids = prompt_ids(bundle.tokenizer, prompt) if isinstance(prompt, str) else prompt
    seen = {}
    handle = editor._module().register_forward_pre_hook(lambda _m, a: seen.__setitem__("a", a[0]))
    editor._editing = True
    try:
        bundle.model(input_ids=torch.tensor([ids]))
    finally:
        editor._editing = False
        handle.remove()
    return seen["a"]


# --- the paper's quantities by hand ------------------------------------------------------------------------

def test_activation_score_is_the_norm_of_the_memory_change_by_hand():
    acts = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])  # [B=1, T=2, d_mlp=3]
    main_m = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]])
    side = main_m + torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # M − M0 by hand
    # A·(M − M0): token 1 [1·1 + 2·1, 2·1] = [3, 2]; token 2 [1, 2 + 1] = [1, 3]
    scores = activation_scores(acts, side, main_m)
    assert torch.allclose(scores, torch.tensor([[math.sqrt(13), math.sqrt(10)]]))
    running = (math.sqrt(13) + math.sqrt(10)) / 2
    assert torch.allclose(prefix_mean(scores, None), torch.tensor([[math.sqrt(13), running]]))
    assert torch.allclose(prefix_mean(scores, torch.tensor([[1, 0]])), torch.tensor([[math.sqrt(13), math.sqrt(13)]]))
    assert torch.allclose(row_mean(scores, torch.tensor([[1, 0]])), torch.tensor([math.sqrt(13)]))


def test_margin_loss_by_hand():
    # α=5, β=20, γ=10; in-scope 25 and 15, out-of-scope 7:
    # pairs 7−25+10 = −8, 7−15+10 = 2 -> mean of positives 2; 7−5 = 2; 20−25 = −5, 20−15 = 5 -> 5
    loss = margin_loss(torch.tensor([25.0, 15.0]), torch.tensor([7.0]), 5.0, 20.0, 10.0)
    assert float(loss) == pytest.approx(2 + 2 + 5)
    assert float(margin_loss(torch.tensor([30.0, 40.0]), torch.tensor([1.0]), 5.0, 20.0, 10.0)) == 0.0
    # two positive pairs (4−12+10 = 2, 4−13+10 = 1): the hinge is their mean, 1.5, not their sum
    assert float(margin_loss(torch.tensor([12.0, 13.0]), torch.tensor([4.0]), 5.0, 1.0, 10.0)) == pytest.approx(1.5)


def test_gradient_masks_have_the_ratio_and_follow_the_seed():
    shape, ratio = torch.Size([64, 80]), 0.2
    masks = [gradient_mask(shape, ratio, seed=3, shard=k) for k in range(3)]
    sd = math.sqrt(ratio * (1 - ratio) / shape.numel())
    for mask in masks:
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert abs(float(mask.mean()) - ratio) < 4 * sd
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert torch.equal(masks[1], gradient_mask(shape, ratio, seed=3, shard=1))
    assert not torch.equal(masks[1], gradient_mask(shape, ratio, seed=4, shard=1))
    overlap = float((masks[0] * masks[1]).mean())  # independent shards overlap in about ratio² of the entries
    assert abs(overlap - ratio ** 2) < 4 * math.sqrt(ratio ** 2 * (1 - ratio ** 2) / shape.numel())


def ties_by_loops(base, tensors, weights, density):
    """TIES written element by element: trim, elect by the sign of the weighted sum, disjoint weighted mean."""
    n = base.numel()
    flat_base = base.flatten().tolist()
    trimmed = []
    for t in tensors:
        delta = [a - b for a, b in zip(t.flatten().tolist(), flat_base)]
        k = int(density * n)
        order = sorted(range(n), key=lambda i: -abs(delta[i]))
        keep = set(order[:k])
        trimmed.append([d if i in keep else 0.0 for i, d in enumerate(delta)])
    out = []
    for i in range(n):
        weighted = [w * d[i] for w, d in zip(weights, trimmed)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0
        chosen = [(w, x) for w, x in zip(weights, weighted) if x != 0 and math.copysign(1.0, x) == sign]
        total_w = sum(w for w, _ in chosen)
        out.append(flat_base[i] + (sum(x for _, x in chosen) / total_w if total_w else 0.0))
    return torch.tensor(out).view_as(base)


def test_ties_merge_matches_an_element_by_element_implementation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    tensors = [base + torch.randn(5, 6, generator=g) for _ in range(3)]
    for weights, density in (([1 / 3] * 3, 0.53), ([0.4 / 2, 0.4 / 2, 0.6], 0.5), ([0.5, 0.25, 0.25], 1.0)):
        ours = ties_merge(base, tensors, weights, density)
        assert torch.allclose(ours, ties_by_loops(base, tensors, weights, density), atol=1e-6)


# --- the editor on the tiny models ---------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_upper_forward_equals_the_full_model_with_the_side_memory(name, tmp_path):
    bundle = load_model(name, "cpu")
    editor = wise_for(bundle, tmp_path)
    editor._install()
    batch = editor.edit_batch(a_case("France", "Paris", "London"))
    noise = torch.randn(editor.memories.main.shape, generator=torch.Generator().manual_seed(1))
    side = editor.memories.main + 0.05 * noise
    editor._editing = True
    upper = UpperForward(bundle, editor.layer, batch)
    fast = upper.logits(upper.acts.float() @ (side - editor.memories.main))
    handle = editor._module().register_forward_hook(lambda _m, a, _o: editor.layer_output(a[0], side))
    try:
        with torch.no_grad():
            full = bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        handle.remove()
        editor.undo()
    picked = full.gather(1, batch.logit_pos.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(fast.detach(), picked, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_an_edit_routes_its_prompt_to_the_side_memory_and_unrelated_prompts_to_the_main(name, tmp_path):
    bundle = load_model(name, "cpu")
    editor = wise_for(bundle, tmp_path)
    case = a_case("France", "Paris", single_token_word(bundle))
    new_id = target_ids(bundle.tokenizer, case.target_new)[0]
    before_params = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    unedited = next_logprobs(bundle, UNRELATED + [case.rewrite_prompt])
    outcome = editor.apply([case])
    assert all(torch.equal(p, before_params[n]) for n, p in bundle.model.named_parameters())
    mem = editor.memories
    # the threshold: act_ratio × the edit's in-scope score, recomputed from the rows' activations
    batch = editor.edit_batch(case)
    rows = []
    for i in range(batch.input_ids.shape[0]):
        real = batch.input_ids[i, : int(batch.attention_mask[i].sum())]
        acts = layer_acts(bundle, editor, real.tolist())
        per_token = [float(activation_scores(acts[0, t], mem.shard, mem.main)) for t in range(len(real))]
        rows.append(sum(per_token) / len(real))
    assert mem.min_score == pytest.approx(sum(rows) / len(rows), rel=1e-4)
    assert editor.threshold() == pytest.approx(0.88 * mem.min_score)
    assert outcome.stats["threshold"] == pytest.approx(editor.threshold())
    # the edited prompt routes to the side memory at its last token and now predicts target_new
    index, _ = editor.route(layer_acts(bundle, editor, case.rewrite_prompt), None)
    assert int(index[0, -1]) == 0
    after = next_logprobs(bundle, UNRELATED + [case.rewrite_prompt])
    assert int(after[-1].argmax()) == new_id != int(unedited[-1].argmax())
    # an unrelated prompt whose score stays below the threshold goes through the main memory: bitwise
    for i, prompt in enumerate(UNRELATED):
        acts = layer_acts(bundle, editor, prompt)
        score = prefix_mean(activation_scores(acts, mem.shard, mem.main), None)
        assert bool((score < editor.threshold()).all()), f"precondition: {prompt!r} scores below the threshold"
        assert torch.equal(after[i], unedited[i])
    editor.undo()
    assert torch.equal(next_logprobs(bundle, UNRELATED + [case.rewrite_prompt]), unedited)
    assert not editor._module()._forward_hooks and not bundle.model._forward_pre_hooks


def test_masked_shard_changes_only_inside_its_mask(tmp_path):
    bundle = load_model("tiny-llama", "cpu")
    editor = wise_for(bundle, tmp_path, weight_decay=0.0, norm_constraint=False, n_iter=5)
    editor.apply([a_case("France", "Paris", "art")])
    mem = editor.memories
    moved = (mem.shard != mem.main).float()
    assert float(moved.sum()) > 0
    assert float((moved * (1 - mem.mask)).sum()) == 0.0
    assert torch.equal(mem.mask, gradient_mask(mem.main.shape, 0.2, seed=0, shard=0))
    editor.undo()


def test_a_stream_saves_shards_merges_them_and_restores(tmp_path):
    bundle = load_model("tiny-llama", "cpu")
    editor = wise_for(bundle, tmp_path, n_iter=5)  # tiny-llama.yaml: save_freq 2, merge_freq 4
    assert editor.parameters_to_touch([]) == []
    before_params = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    unedited = next_logprobs(bundle, UNRELATED)
    cases = [a_case(s, t, "art", i) for i, (s, t) in enumerate(SUBJECTS)]
    editor.apply(cases[:2])
    first_mask = editor.memories.mask.clone()
    assert len(editor.memories.saved) == 1 and editor.memories.shard_edits == 0
    assert torch.equal(editor.memories.shard, editor.memories.main)  # a new shard starts from the main memory
    editor.apply(cases[2:3])
    assert torch.equal(editor.memories.mask, gradient_mask(first_mask.shape, 0.2, seed=0, shard=1))
    assert not torch.equal(editor.memories.mask, first_mask)
    merging = []
    merge = editor.merge
    editor.merge = lambda: merging.append([m.clone() for m in editor.memories.saved]) or merge()
    stats = editor.apply(cases[3:]).stats
    mem = editor.memories
    assert stats["merged"] == 1.0 and mem.saved == [] and len(merging[0]) == 2
    # the first merge: TIES of the two shards over the main memory, weight 1.0 / 2 each, densities 0.53
    assert torch.equal(mem.merged, ties_merge(mem.main, merging[0], [0.5, 0.5], 0.53))
    editor.undo()
    assert all(torch.equal(p, before_params[n]) for n, p in bundle.model.named_parameters())
    assert torch.equal(next_logprobs(bundle, UNRELATED), unedited)


def test_a_later_merge_weighs_the_merged_memory_by_0_6(tmp_path):
    bundle = load_model("tiny-gpt2", "cpu")
    editor = wise_for(bundle, tmp_path, n_iter=3, save_freq=1, merge_freq=2)
    merging = []
    merge = editor.merge
    editor.merge = lambda: merging.append(([m.clone() for m in editor.memories.saved],
                                           editor.memories.merged)) or merge()
    editor.apply([a_case(s, t, "art", i) for i, (s, t) in enumerate(SUBJECTS)])
    (shards1, none), (shards2, merged1) = merging
    mem = editor.memories
    assert none is None and len(shards1) == len(shards2) == 2
    assert torch.equal(merged1, ties_merge(mem.main, shards1, [0.5, 0.5], 0.53))
    assert torch.equal(mem.merged, ties_merge(mem.main, [*shards2, merged1], [0.2, 0.2, 0.6], 0.53))
    editor.undo()


def test_routing_is_seen_through_the_bridge(tmp_path):
    bundle = load_model("tiny-llama", "cpu")
    editor = wise_for(bundle, tmp_path)
    case = a_case("France", "Paris", single_token_word(bundle))
    new_id = target_ids(bundle.tokenizer, case.target_new)[0]
    editor.apply([case])
    assert_bridge_predicts(bundle, case.rewrite_prompt, new_id)
    editor.undo()


def test_settings_fail_with_one_line(tmp_path):
    bundle = load_model("tiny-llama", "cpu")
    with pytest.raises(EditorError, match="^wise: merge_freq \\(3\\) must be a multiple of save_freq \\(2\\)$"):
        wise_for(bundle, tmp_path, merge_freq=3)
    with pytest.raises(HparamsError, match="key 'retrieve': True is not one of False"):
        wise_for(bundle, tmp_path, retrieve=True)
    with pytest.raises(HparamsError, match="key 'act_margin': expected exactly 3 items"):
        wise_for(bundle, tmp_path, act_margin=[1.0, 2.0])
    with pytest.raises(HparamsError, match="layer 4 is outside the model's layers 0..3"):
        get_editor("wise").HPARAMS.from_mapping({"layers": [4]}, "f.yaml", n_layers=4)


def test_cli_sequential_wise_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: ["Rivers run through old towns."] if n else None)
    hp, _ = load_hparams("wise", "tiny-llama", "llama")
    path = tmp_path / "wise.yaml"
    path.write_text(json.dumps({**hp, "out_of_scope_corpus": out_of_scope_corpus(tmp_path), "n_iter": 5}))
    out = tmp_path / "runs"
    assert main(["run", "--editor", "wise", "--model", "tiny-llama", "--sequential", "--n", "4", "--eval-every", "2",
                 "--no-circuits", "--all-cases", "--output", str(out), "--hparams", str(path)]) == 0
    (run_dir,) = out.iterdir()
    curve = [json.loads(line) for line in (run_dir / "sequential.jsonl").read_text().splitlines()]
    assert [p["n_edits"] for p in curve] == [0, 2, 4]
    records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 4
    assert [r["edit"]["n_edits"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["edit"]["has_merged"] == 1.0


def test_routing_leaves_left_padding_out_of_the_score(tmp_path):
    """The model call's attention mask reaches the routing; padded positions do not count in a prefix's score."""
    bundle = load_model("tiny-llama", "cpu")
    editor = wise_for(bundle, tmp_path)
    case = a_case("France", "Paris", single_token_word(bundle))
    editor.apply([case])
    ids = prompt_ids(bundle.tokenizer, case.rewrite_prompt)
    padded = torch.tensor([[0, 0, 0] + ids])
    mask = torch.tensor([[0, 0, 0] + [1] * len(ids)])
    seen = []
    route = editor.route
    editor.route = lambda acts, m: seen.append(m) or route(acts, m)
    with torch.no_grad():
        bundle.model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert torch.equal(seen[0], mask)
    mem = editor.memories
    token_scores = activation_scores(layer_acts(bundle, editor, [0, 0, 0] + ids), mem.shard, mem.main)
    routed = prefix_mean(token_scores, mask)
    assert float(routed[0, 3]) == pytest.approx(float(token_scores[0, 3]))  # the first real token: its own score
    assert float(routed[0, 4]) == pytest.approx(float(token_scores[0, 3:5].mean()))
    editor.undo()
    assert editor._mask is None
