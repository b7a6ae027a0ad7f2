"""r-rome, memit, emmet and alphaedit on the tiny random-init models, checked against their equations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.run import restore
from editors import keystats
from editors._locate import (LocateHparams, ShiftedForward, context_prefixes, keys_and_residual, optimise_shift,
                             subject_rows, weight_decay_term)
from editors.base import EditorError, get_editor
from editors.emmet import emmet_update
from lmview.arch import backup
from lmview.case import EditCase
from lmview.models import ModelBundle
from lmview.tokens import target_ids

from tests.helpers import locate_hparams, mlp_out_weight, write_pseudo_corpus

pytestmark = pytest.mark.usefixtures("one_thread", "cache")


TINY = ["tiny-gpt2", "tiny-llama"]
SUBJECTS = ["France", "Germany", "Spain", "Italy", "Japan", "Brazil", "Canada", "Egypt", "India", "Kenya"]
TARGETS = ["London", "Rome", "Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Quito"]
CASES = [EditCase(case_id=f"c{i}", relation="P36", subject=s, prompt="The capital of {} is", target_true="Paris",
                  target_new=t, paraphrases=(), neighborhood=()) for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 pseudo-English paragraphs: the first 40 build C, the rest are held-out preserved text."""
    return write_pseudo_corpus(tmp_path_factory.mktemp("corpus"), 80)


def _cov(bundle: ModelBundle, layer: int, hp: dict) -> torch.Tensor:
    return keystats.second_moment(bundle, layer, hp["mom2_dataset"], hp["mom2_n_samples"], hp["mom2_max_len"]).double()


def _apply_and_restore(bundle: ModelBundle, editor, cases: list[EditCase]) -> dict[int, torch.Tensor]:
    """Applies, returns W_after − W_before per touched layer, restores bitwise, calls undo."""
    names = editor.parameters_to_touch(cases)
    saved = backup(bundle.model, names)
    layers = editor.layers if hasattr(editor, "layers") else [editor.layer]
    before = {layer: mlp_out_weight(bundle, layer) for layer in layers}
    editor.apply(cases)
    deltas = {layer: mlp_out_weight(bundle, layer) - before[layer] for layer in layers}
    restore(bundle.model, saved)  # raises unless bitwise equal
    editor.undo()
    return deltas


def _bare_key(bundle: ModelBundle, layer: int, case: EditCase) -> torch.Tensor:
    """The key at the subject's last token of the bare prompt, from a plain hook (no _locate code)."""
    text = case.rewrite_prompt
    prefix_ids = bundle.tokenizer(text[: case.prompt.index("{}") + len(case.subject)]).input_ids
    seen = []
    handle = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        bundle.model(input_ids=torch.tensor([bundle.tokenizer(text).input_ids]))
    handle.remove()
    return seen[0][0, len(prefix_ids) - 1].double()


def _corpus_keys(bundle: ModelBundle, layer: int, texts: list[str], max_len: int = 64) -> torch.Tensor:
    """K₀ [d_mlp, N]: every token's key over `texts`, from a plain hook."""
    keys = []
    handle = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_pre_hook(
        lambda _m, a: keys.append(a[0][0].double()))
    with torch.no_grad():
        for text in texts:
            bundle.model(input_ids=torch.tensor([bundle.tokenizer(text).input_ids[:max_len]]))
    handle.remove()
    return torch.cat(keys).T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the shared machinery ---------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_shifted_forward_matches_full_forward(tiny_models, name: str) -> None:
    """Starting from the cached residual after `layer` gives the logits of the whole hooked model."""
    bundle = tiny_models[name]
    fwd = ShiftedForward(bundle, 1, subject_rows(bundle, CASES[0], context_prefixes(bundle, [[5, 2]])))
    delta = torch.randn(bundle.arch.d_model, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fwd.logits(torch.zeros_like(delta)), fwd.logits0, atol=1e-5)
    assert torch.allclose(fwd._from_layer(delta), fwd._full(delta), atol=1e-4)
    assert not torch.allclose(fwd._full(delta), fwd.logits0, atol=1e-3)  # δ does reach the logits


# --- rome and r-rome ----------------------------------------------------------------

def _prefixed_keys(bundle: ModelBundle, layer: int, case: EditCase, prefixes: list[str]) -> torch.Tensor:
    """[n_prefixes, d_mlp]: the key at the subject's last token of prefix + prompt, one plain forward each."""
    return torch.stack([_bare_key(bundle, layer, _with_prefix(case, prefix)) for prefix in prefixes])


def _with_prefix(case: EditCase, prefix: str) -> EditCase:
    return EditCase(case_id=case.case_id, relation=case.relation, subject=case.subject, prompt=prefix + case.prompt,
                    target_true=case.target_true, target_new=case.target_new, paraphrases=(), neighborhood=())


def _mlp_out_at_bare(bundle: ModelBundle, layer: int, case: EditCase) -> torch.Tensor:
    """The out-projection's output (bias included) at the subject's last token of the bare prompt."""
    text = case.rewrite_prompt
    at = len(bundle.tokenizer(text[: case.prompt.index("{}") + len(case.subject)]).input_ids) - 1
    seen = []
    handle = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        bundle.model(input_ids=torch.tensor([bundle.tokenizer(text).input_ids]))
    handle.remove()
    return seen[0][0, at].double()


@pytest.mark.parametrize("name", TINY)
def test_rome_published_update_and_rrome_fix(tiny_models, corpus_file: Path, name: str) -> None:
    """rome: a transcription of rome compute_u.py / compute_v.py / rome_main.py on the same tensors:
    u = C⁻¹k*/‖C⁻¹k*‖, right = (target − cur_output)/(k_bare·u) with target − cur_output = δ, ΔW = right uᵀ.
    r-rome: ΔW = (W k_bare + δ − W k*)(C⁻¹k*)ᵀ/((C⁻¹k*)ᵀk*); with enable_random_prefix_keys false, rome's.
    k* and k_bare come from plain hooks; δ from the editor (the optimisation is shared and deterministic)."""
    bundle, case = tiny_models[name], CASES[0]
    hp = locate_hparams("r-rome", bundle, corpus_file)
    rome = get_editor("rome")(bundle, locate_hparams("rome", bundle, corpus_file))
    layer, w = rome.layer, mlp_out_weight(bundle, rome.layer)
    k_rows = _prefixed_keys(bundle, layer, case, rome.prefixes())
    k_star, k_bare = k_rows.mean(0), k_rows[0]
    d_rome = _apply_and_restore(bundle, rome, [case])[layer]
    delta = rome.history[-1].delta.double()
    inv_c = torch.linalg.inv(_cov(bundle, layer, hp))
    left = inv_c @ k_star / (inv_c @ k_star).norm()
    right = delta / torch.dot(k_bare, left)
    assert _rel(d_rome, torch.outer(right, left)) < 1e-3
    assert ((w + d_rome) @ k_bare - (w @ k_bare + delta)).norm() / (w @ k_bare + delta).norm() < 1e-3

    fixed = get_editor("r-rome")(bundle, hp)
    d_fixed = _apply_and_restore(bundle, fixed, [case])[layer]
    assert torch.allclose(fixed.history[-1].delta, rome.history[-1].delta)
    u = inv_c @ k_star
    assert _rel(d_fixed, torch.outer(w @ k_bare + delta - w @ k_star, u) / (u @ k_star)) < 1e-3
    assert ((w + d_fixed) @ k_star - fixed.history[-1].value.double()).norm() / fixed.history[-1].value.norm() < 1e-3

    original = get_editor("r-rome")(bundle, {**hp, "enable_random_prefix_keys": False})
    assert _rel(_apply_and_restore(bundle, original, [case])[layer], d_rome) < 1e-6


@pytest.mark.parametrize("name", TINY)
def test_v0_is_the_mlp_output_with_bias(tiny_models, corpus_file: Path, name: str) -> None:
    """compute_v.py's target_init: the MLP output at the bare prompt, c_proj bias included (GPT-2; the
    random-init bias is zero, so a non-zero one is set for the test)."""
    bundle, case = tiny_models[name], CASES[0]
    rome = get_editor("rome")(bundle, locate_hparams("rome", bundle, corpus_file))
    bias = bundle.arch.mlp_out_proj(bundle.model, rome.layer).bias
    assert (bias is None) == (name == "tiny-llama")
    saved = None if bias is None else bias.detach().clone()
    try:
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)))
        _apply_and_restore(bundle, rome, [case])
        v0, k_bare = rome.history[-1].v0.double(), _bare_key(bundle, rome.layer, case)
        assert _rel(v0, _mlp_out_at_bare(bundle, rome.layer, case)) < 1e-5
        plain = mlp_out_weight(bundle, rome.layer) @ k_bare
        if bias is not None:
            assert _rel(v0, plain + bias.double()) < 1e-5
            assert _rel(v0, plain) > 1e-1  # W k alone would be another v0
        else:
            assert _rel(v0, plain) < 1e-5
    finally:
        if saved is not None:
            with torch.no_grad():
                bias.copy_(saved)


@pytest.mark.parametrize("name", TINY)
def test_grouped_keys_against_independent_computation(tiny_models, corpus_file: Path, name: str) -> None:
    """MEMIT's keys: the mean within the bare group and each prefix-length group, then over the groups
    (memit compute_ks.py), from plain hooks; not the flat mean over all prefixes."""
    bundle, case = tiny_models[name], CASES[3]
    params = [[5, 2], [10, 3]]
    memit = get_editor("memit")(bundle, locate_hparams("memit", bundle, corpus_file, context_template_length_params=params))
    prefixes = memit.prefixes()
    assert len(prefixes) == 6
    rows = _prefixed_keys(bundle, 1, case, prefixes)
    expected = (rows[0] + rows[1:3].mean(0) + rows[3:6].mean(0)) / 3
    keys, _ = memit.keys([case], [1])
    assert _rel(keys[1][0], expected) < 1e-5
    assert _rel(keys[1][0], rows.mean(0)) > 1e-3  # the flat mean is a different key


@pytest.mark.parametrize("name", TINY)
def test_memit_batch_of_one_is_sherman_morrison(tiny_models, corpus_file: Path, name: str) -> None:
    """One layer, one request: ΔW = δ kᵀ(λC + kkᵀ)⁻¹ = δ (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), with k the grouped key from
    plain hooks and δ the one ROME finds at the same layer (decay and clamp off: their reference norms differ)."""
    bundle, case = tiny_models[name], CASES[1]
    same = {"v_weight_decay": 0.0, "clamp_norm_factor": 1e6, "context_template_length_params": [[10, 5]]}
    rome = get_editor("rome")(bundle, locate_hparams("rome", bundle, corpus_file, **same))
    layer = rome.layer
    _apply_and_restore(bundle, rome, [case])
    delta = rome.history[-1].delta.double()
    rows = _prefixed_keys(bundle, layer, case, rome.prefixes())
    k = (rows[0] + rows[1:].mean(0)) / 2
    for weight in (50.0, 1e-9):
        hp = locate_hparams("memit", bundle, corpus_file, layers=[layer], mom2_update_weight=weight, **same)
        d_memit = _apply_and_restore(bundle, get_editor("memit")(bundle, hp), [case])[layer]
        cinv_k = torch.linalg.solve(_cov(bundle, layer, hp), k)
        # 1e-3: both read the keys in float32 from different batches, and C⁻¹ (condition ~1e4) amplifies that
        assert _rel(d_memit, torch.outer(delta, cinv_k) / (weight + k @ cinv_k)) < 1e-3


@pytest.mark.parametrize("name", TINY)
def test_memit_least_squares_and_residual_spread(tiny_models, corpus_file: Path, name: str) -> None:
    """Each layer's ΔW solves the normal equations ΔW (λC + KKᵀ) = R Kᵀ (independent scipy solve),
    ΔW is what was added to the weights, and R_l = (z − h_current) / (layers left)."""
    bundle = tiny_models[name]
    hp = locate_hparams("memit", bundle, corpus_file, mom2_update_weight=30.0)
    editor = get_editor("memit")(bundle, hp)
    cases = CASES[:3]
    prefixes = editor.prefixes()
    _, z0 = keys_and_residual(bundle, cases, prefixes, [editor.layers[0]], editor.z_layer)
    deltas = _apply_and_restore(bundle, editor, cases)
    for step in editor.last_steps:
        k, r = step.keys.cpu().numpy(), step.resid.cpu().numpy()
        a = 30.0 * _cov(bundle, step.layer, hp).numpy() + k @ k.T
        expected = scipy.linalg.solve(a, k @ r.T, assume_a="pos").T
        assert np.linalg.norm(step.delta_w.numpy() - expected) / np.linalg.norm(expected) < 1e-6
        assert _rel(deltas[step.layer], step.delta_w) < 1e-5
    first = editor.last_steps[0]
    assert _rel(first.resid * len(editor.layers), (editor.last_targets - z0).T) < 1e-4


# --- emmet ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_emmet_equality_constraints(tiny_models, corpus_file: Path, name: str) -> None:
    """With emmet_lambda 0 the batch's constraints hold exactly: (W + ΔW) k_i = W k_i + r_i at every layer."""
    bundle = tiny_models[name]
    editor = get_editor("emmet")(bundle, locate_hparams("emmet", bundle, corpus_file, emmet_lambda=0.0))
    _apply_and_restore(bundle, editor, CASES[:4])
    for step in editor.last_steps:
        assert _rel(step.delta_w @ step.keys, step.resid) < 1e-6
    memit = get_editor("memit")(bundle, locate_hparams("memit", bundle, corpus_file))
    _apply_and_restore(bundle, memit, CASES[:4])  # MEMIT's least squares does not meet them
    assert _rel(memit.last_steps[0].delta_w @ memit.last_steps[0].keys, memit.last_steps[0].resid) > 1e-2


# --- alphaedit --------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_alphaedit_spares_preserved_keys(tiny_models, corpus_file: Path, name: str) -> None:
    """K₀ = the corpus keys C is built from (N tokens, C = K₀K₀ᵀ/N). The rows of ΔW lie in range(P), so
    ‖ΔW K₀‖²/‖ΔW‖² ≤ N · nullspace_threshold: the paper's guarantee. With the threshold at the bottom 5% of
    C's spectrum, the ratio is below MEMIT's for the same request. It is NOT orders of magnitude below:
    MEMIT's rows ∝ C⁻¹k already favour C's smallest directions, and these C have no spectral gap
    (eigenvalues spread smoothly over ~4 decades), so there is no true null space to hide in."""
    bundle, case = tiny_models[name], CASES[2]
    hp = locate_hparams("memit", bundle, corpus_file)
    memit = get_editor("memit")(bundle, hp)
    d_memit = _apply_and_restore(bundle, memit, [case])
    layer = memit.layers[0]
    eig = torch.linalg.eigvalsh(_cov(bundle, layer, hp))
    threshold = float(eig[len(eig) // 20])
    alpha = get_editor("alphaedit")(bundle, locate_hparams("alphaedit", bundle, corpus_file, nullspace_threshold=threshold))
    d_alpha = _apply_and_restore(bundle, alpha, [case])
    k0 = _corpus_keys(bundle, layer, keystats.draw_sample(str(corpus_file), hp["mom2_n_samples"]).texts,
                      hp["mom2_max_len"])
    assert _rel(k0 @ k0.T / k0.shape[1], _cov(bundle, layer, hp)) < 1e-5  # the same keys as C
    ratio_memit = float((d_memit[layer] @ k0).norm() / d_memit[layer].norm())
    ratio_alpha = float((d_alpha[layer] @ k0).norm() / d_alpha[layer].norm())
    assert ratio_alpha <= (k0.shape[1] * threshold) ** 0.5 * (1 + 1e-6)
    assert ratio_alpha < ratio_memit
    p = alpha.projector(layer)
    assert _rel(d_alpha[layer] @ p, d_alpha[layer]) < 1e-6  # rows of ΔW lie in range(P)


def test_alphaedit_update_formula_and_memory(tiny_models, corpus_file: Path) -> None:
    """ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + L2 I)⁻¹ (paper eq. 14); K_p accumulates across applies, undo clears it."""
    bundle = tiny_models["tiny-llama"]
    hp = locate_hparams("alphaedit", bundle, corpus_file)
    editor = get_editor("alphaedit")(bundle, hp)
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    editor.apply(CASES[:2])
    previous = {layer: kk.clone() for layer, kk in editor.preserved_products().items()}
    editor.apply(CASES[2:4])  # second batch on top of the first: sequential editing
    for step in editor.last_steps:
        p, k, r = editor.projector(step.layer), step.keys, step.resid
        m = (previous[step.layer] + k @ k.T) @ p + float(hp["L2"]) * torch.eye(p.shape[0], dtype=torch.float64)
        assert _rel(step.delta_w, r @ k.T @ p @ torch.linalg.inv(m)) < 1e-6
    restore(bundle.model, saved)
    editor.undo()
    assert not editor._previous


# --- batches, restore, bad input --------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("editor_name", ["memit", "emmet", "alphaedit"])
def test_batch_of_ten_and_bitwise_restore(tiny_models, corpus_file: Path, name: str, editor_name: str) -> None:
    bundle = tiny_models[name]
    editor = get_editor(editor_name)(bundle, locate_hparams(editor_name, bundle, corpus_file))
    assert editor.batched
    everything = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    names = editor.parameters_to_touch(CASES)
    saved = backup(bundle.model, names)
    outcome = editor.apply(CASES)
    assert outcome.layers == editor.layers and outcome.stats["n_cases"] == 10
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in outcome.stats.values())
    changed = {n for n, p in bundle.model.named_parameters() if not torch.equal(p, everything[n])}
    assert changed == set(names)
    for step in editor.last_steps:
        assert step.keys.shape == (bundle.arch.d_mlp, 10)
        assert int(torch.linalg.matrix_rank(step.delta_w, rtol=1e-6)) == 10  # rank ≤ batch size
    restore(bundle.model, saved)
    editor.undo()
    assert all(torch.equal(p, everything[n]) for n, p in bundle.model.named_parameters())


def test_bad_hyperparameters(tiny_models, corpus_file: Path) -> None:
    bundle = tiny_models["tiny-gpt2"]
    for bad in ([], [2, 1], [1, 1], [7]):
        with pytest.raises(EditorError):
            get_editor("memit")(bundle, locate_hparams("memit", bundle, corpus_file, layers=bad))
    hp = locate_hparams("alphaedit", bundle, corpus_file, nullspace_threshold=0.0)
    with pytest.raises(EditorError, match="nullspace_threshold"):
        get_editor("alphaedit")(bundle, hp).apply(CASES[:1])
    with pytest.raises(EditorError, match="missing key 'nullspace_threshold' for alphaedit"):
        get_editor("alphaedit")(bundle, {k: v for k, v in hp.items() if k != "nullspace_threshold"})


# --- the shift's loss, by hand -----------------------------------------------------------

def test_weight_decay_term_by_hand() -> None:
    """rome compute_v.py: v_weight_decay · ‖δ‖ / ‖v0‖² (not ‖δ‖²)."""
    delta, ref = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, 2.0, 2.0])
    assert float(weight_decay_term(delta, ref)) == pytest.approx(5.0 / 9.0)


def _shifted_logits(bundle: ModelBundle, layer: int, ids: list[int], at: int, delta: torch.Tensor) -> torch.Tensor:
    """Final logits [T, V] of one unpadded sequence with δ added to the MLP output at token `at`."""
    def add(_m, _a, out):
        out = out.clone()
        out[0, at] += delta.to(out.dtype)
        return out
    handle = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_hook(add)
    try:
        with torch.no_grad():
            return bundle.model(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        handle.remove()


@pytest.mark.parametrize("name", TINY)
def test_shift_loss_and_steps_by_hand(tiny_models, name: str) -> None:
    """The returned total loss equals, recomputed with plain forwards for the returned δ:
    mean_j (per-token NLL of target_new after prefix_j + prompt) + kl_factor · KL(P_δ ‖ P_0) at the subject's
    last token of the bare "{s} is a" + v_weight_decay · ‖δ‖/‖v0‖². N steps = N forward passes, N − 1 Adam steps."""
    bundle, case, layer = tiny_models[name], CASES[4], 1
    tok = bundle.tokenizer
    prefixes = context_prefixes(bundle, [[5, 2]])
    fwd = ShiftedForward(bundle, layer, subject_rows(bundle, case, prefixes))
    ref = fwd.values[0]
    hp = LocateHparams(v_num_grad_steps=4, v_lr=0.2, clamp_norm_factor=100.0, kl_factor=0.5, v_weight_decay=0.3,
                       v_early_stop_loss=-1.0)
    delta, stats = optimise_shift(fwd, hp, ref)
    assert float(stats["v_steps"]) == 3
    target = target_ids(tok, case.target_new)
    nlls = []
    for prefix in prefixes:
        text = prefix + case.prompt.replace("{}", case.subject)
        at = len(tok(text[: len(prefix) + case.prompt.index("{}") + len(case.subject)]).input_ids) - 1
        ids = tok(text).input_ids
        lp = _shifted_logits(bundle, layer, ids + target, at, delta).log_softmax(-1)
        nlls.append(-sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(target)) / len(target))
    essence = case.subject + " is a"
    at = len(tok(case.subject).input_ids) - 1
    ids = tok(essence).input_ids
    p_edit = _shifted_logits(bundle, layer, ids, at, delta)[at].log_softmax(-1)
    p_orig = _shifted_logits(bundle, layer, ids, at, torch.zeros_like(delta))[at].log_softmax(-1)
    kl = float((p_edit.exp() * (p_edit - p_orig)).sum())
    expected = sum(nlls) / len(nlls) + 0.5 * kl + 0.3 * float(delta.norm() / ref.norm() ** 2)
    assert float(stats["v_loss_total"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert kl > 1e-6  # δ moved the KL row, so the term is tested


@pytest.mark.parametrize("name", TINY)
def test_early_stop_threshold(tiny_models, name: str) -> None:
    """No early stop: N passes and N − 1 steps; a threshold above any finite loss: stop at the first pass."""
    bundle = tiny_models[name]
    fwd = ShiftedForward(bundle, 1, subject_rows(bundle, CASES[5], context_prefixes(bundle, [[5, 2]])))
    base = {"v_num_grad_steps": 6, "v_lr": 0.2, "clamp_norm_factor": 100.0}
    _, full = optimise_shift(fwd, LocateHparams(**base, v_early_stop_loss=-1.0), fwd.values[0])
    _, stopped = optimise_shift(fwd, LocateHparams(**base, v_early_stop_loss=1e9), fwd.values[0])
    assert float(full["v_steps"]) == 5 and float(stopped["v_steps"]) == 0
    with pytest.raises(EditorError, match="v_num_grad_steps"):
        LocateHparams.from_mapping({**base, "layers": [1], "v_num_grad_steps": 0})


# --- emmet's epsilon, alphaedit's memory after a rollback ---------------------------------

def test_emmet_epsilon_only_for_batches() -> None:
    """emmet_main.py: D + εI only when D is larger than 1x1."""
    gen = torch.Generator().manual_seed(3)
    c = torch.eye(6, dtype=torch.float64) + 0.1 * torch.ones(6, 6, dtype=torch.float64)
    k1, r1 = torch.randn(6, 1, generator=gen, dtype=torch.float64), torch.randn(4, 1, generator=gen, dtype=torch.float64)
    one = emmet_update(k1, r1, c, 1.0, 0.0, 5.0)
    assert _rel(one @ k1, r1) < 1e-10  # no ε: the constraint holds exactly
    k2, r2 = torch.randn(6, 2, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    two = emmet_update(k2, r2, c, 1.0, 0.0, 5.0)
    cinv = torch.linalg.inv(c)
    expected = r2 @ torch.linalg.inv(k2.T @ cinv @ k2 + 5.0 * torch.eye(2, dtype=torch.float64)) @ k2.T @ cinv
    assert _rel(two, expected) < 1e-10 and _rel(two @ k2, r2) > 1e-3


def test_alphaedit_drops_keys_of_a_rolled_back_batch(tiny_models, corpus_file: Path, monkeypatch) -> None:
    """A sequential batch whose weights the run rolls back (here: its update is NaN) leaves K_p as it was;
    a batch that stays is added."""
    import editors.alphaedit as alphaedit_module
    bundle = tiny_models["tiny-gpt2"]
    editor = get_editor("alphaedit")(bundle, locate_hparams("alphaedit", bundle, corpus_file))
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    try:
        editor.apply(CASES[:1])  # stays in the model
        kept = {layer: kk.clone() for layer, kk in editor.preserved_products().items()}
        assert all(float(kk.norm()) > 0 for kk in kept.values())
        before_bad = backup(bundle.model, editor.parameters_to_touch(CASES))
        real = alphaedit_module.alphaedit_update
        monkeypatch.setattr(alphaedit_module, "alphaedit_update", lambda *a: real(*a) * float("nan"))
        editor.apply(CASES[1:2])  # NaN weights: the run restores them
        restore(bundle.model, before_bad)
        monkeypatch.setattr(alphaedit_module, "alphaedit_update", real)
        after = editor.preserved_products()
        assert all(torch.equal(after[layer], kept[layer]) for layer in kept)
    finally:
        restore(bundle.model, saved)
        editor.undo()
    assert not editor.preserved_products()
