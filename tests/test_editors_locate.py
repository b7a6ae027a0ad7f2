"""r-rome, memit, emmet and alphaedit on the tiny random-init models, checked against their equations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.corpus import load_corpus
from bench.data import EditCase
from bench.models import ModelBundle, load_model
from bench.run import backup, restore
from editors import keystats
from editors._locate import ShiftedForward, context_prefixes, keys_and_residual, subject_rows
from editors.base import EditorError, get_editor, load_hparams

from conftest import write_pseudo_corpus

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


@pytest.fixture(scope="module")
def models() -> dict[str, ModelBundle]:
    return {name: load_model(name, "cpu") for name in TINY}


def _hparams(editor: str, bundle: ModelBundle, corpus: Path, **extra) -> dict:
    hp, _ = load_hparams(editor, bundle.name, bundle.arch.family)
    return {**hp, "mom2_dataset": str(corpus), "mom2_n_samples": 40, **extra}


def _cov(bundle: ModelBundle, layer: int, hp: dict) -> torch.Tensor:
    return keystats.second_moment(bundle, layer, hp["mom2_dataset"], hp["mom2_n_samples"], hp["mom2_max_len"]).double()


def _w(bundle: ModelBundle, layer: int) -> torch.Tensor:
    return bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double().clone()


def _apply_and_restore(bundle: ModelBundle, editor, cases: list[EditCase]) -> dict[int, torch.Tensor]:
    """Applies, returns W_after − W_before per touched layer, restores bitwise, calls undo."""
    names = editor.parameters_to_touch(cases)
    saved = backup(bundle.model, names)
    layers = editor.layers if hasattr(editor, "layers") else [editor.layer]
    before = {layer: _w(bundle, layer) for layer in layers}
    editor.apply(cases)
    deltas = {layer: _w(bundle, layer) - before[layer] for layer in layers}
    restore(bundle.model, saved)  # raises unless bitwise equal
    editor.undo()
    return deltas


def _bare_key(bundle: ModelBundle, layer: int, case: EditCase) -> torch.Tensor:
    """The key at the subject's last token of the bare prompt, from a plain hook (no _locate code)."""
    text = case.rewrite_prompt
    prefix_ids = bundle.tokenizer(text[: text.index(case.subject) + len(case.subject)]).input_ids
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
def test_shifted_forward_matches_full_forward(models, name: str) -> None:
    """Starting from the cached residual after `layer` gives the logits of the whole hooked model."""
    bundle = models[name]
    fwd = ShiftedForward(bundle, 1, subject_rows(bundle, CASES[0], context_prefixes(bundle, [[5, 2]])))
    delta = torch.randn(bundle.arch.d_model, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fwd.logits(torch.zeros_like(delta)), fwd.logits0, atol=1e-5)
    assert torch.allclose(fwd._from_layer(delta), fwd._full(delta), atol=1e-4)
    assert not torch.allclose(fwd._full(delta), fwd.logits0, atol=1e-3)  # δ does reach the logits


# --- r-rome -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_rrome_update_against_paper(models, corpus_file: Path, name: str) -> None:
    """r-ROME eq.: ΔW = (W k_b + δ − W k*)(C⁻¹k*)ᵀ/((C⁻¹k*)ᵀk*); the original code's: δ (C⁻¹k*)ᵀ/((C⁻¹k*)ᵀk_b).
    δ and k* come from `rome` on the same model (the optimisation is shared and deterministic)."""
    bundle, case = models[name], CASES[0]
    hp = _hparams("r-rome", bundle, corpus_file)
    rome = get_editor("rome")(bundle, _hparams("rome", bundle, corpus_file))
    d_rome = _apply_and_restore(bundle, rome, [case])[rome.layer]
    step = rome.history[-1]
    layer, w = rome.layer, _w(bundle, rome.layer)
    k_star, delta = step.key.double(), (step.value - step.v0).double()
    k_bare = _bare_key(bundle, layer, case)
    u = torch.linalg.inv(_cov(bundle, layer, hp)) @ k_star

    fixed = get_editor("r-rome")(bundle, hp)
    d_fixed = _apply_and_restore(bundle, fixed, [case])[layer]
    expected = torch.outer(w @ k_bare + delta - w @ k_star, u) / (u @ k_star)
    assert _rel(d_fixed, expected) < 1e-3
    assert _rel(d_fixed - d_rome, torch.outer(w @ (k_bare - k_star), u) / (u @ k_star)) < 1e-3  # the stated difference
    assert ((w + d_fixed) @ k_star - fixed.history[-1].value.double()).norm() / fixed.history[-1].value.norm() < 1e-3

    original = get_editor("r-rome")(bundle, {**hp, "enable_random_prefix_keys": False})
    d_orig = _apply_and_restore(bundle, original, [case])[layer]
    assert _rel(d_orig, torch.outer(delta, u) / (u @ k_bare)) < 1e-3
    assert ((w + d_orig) @ k_bare - (w @ k_bare + delta)).norm() / (w @ k_bare + delta).norm() < 1e-3


# --- memit ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_memit_batch_of_one_vs_rome(models, corpus_file: Path, name: str) -> None:
    """One layer, one request, no decay or clamp: both optimise the same δ at the same layer, and
    Sherman-Morrison gives ΔW_memit = ΔW_rome · kᵀC⁻¹k / (λ + kᵀC⁻¹k). The remaining known
    differences (decay/clamp relative to ‖z₀‖ instead of ‖W k*‖, several layers) are switched off."""
    bundle, case = models[name], CASES[1]
    same = {"v_weight_decay": 0.0, "clamp_norm_factor": 1e6, "context_template_length_params": [[10, 5]]}
    rome = get_editor("rome")(bundle, _hparams("rome", bundle, corpus_file, **same))
    layer = rome.layer
    d_rome = _apply_and_restore(bundle, rome, [case])[layer]
    k = rome.history[-1].key.double()
    for weight in (50.0, 1e-9):
        hp = _hparams("memit", bundle, corpus_file, layers=[layer], mom2_update_weight=weight, **same)
        d_memit = _apply_and_restore(bundle, get_editor("memit")(bundle, hp), [case])[layer]
        q = k @ torch.linalg.solve(_cov(bundle, layer, hp), k)
        # 1e-3: both read the keys in float32 from different batches, and C⁻¹ (condition ~1e4) amplifies that
        assert _rel(d_memit, d_rome * q / (weight + q)) < 1e-3
    assert _rel(d_memit, d_rome) < 1e-3  # λ → 0: ROME


@pytest.mark.parametrize("name", TINY)
def test_memit_least_squares_and_residual_spread(models, corpus_file: Path, name: str) -> None:
    """Each layer's ΔW solves the normal equations ΔW (λC + KKᵀ) = R Kᵀ (independent scipy solve),
    ΔW is what was added to the weights, and R_l = (z − h_current) / (layers left)."""
    bundle = models[name]
    hp = _hparams("memit", bundle, corpus_file, mom2_update_weight=30.0)
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
def test_emmet_equality_constraints(models, corpus_file: Path, name: str) -> None:
    """With emmet_lambda 0 the batch's constraints hold exactly: (W + ΔW) k_i = W k_i + r_i at every layer."""
    bundle = models[name]
    editor = get_editor("emmet")(bundle, _hparams("emmet", bundle, corpus_file, emmet_lambda=0.0))
    _apply_and_restore(bundle, editor, CASES[:4])
    for step in editor.last_steps:
        assert _rel(step.delta_w @ step.keys, step.resid) < 1e-6
    memit = get_editor("memit")(bundle, _hparams("memit", bundle, corpus_file))
    _apply_and_restore(bundle, memit, CASES[:4])  # MEMIT's least squares does not meet them
    assert _rel(memit.last_steps[0].delta_w @ memit.last_steps[0].keys, memit.last_steps[0].resid) > 1e-2


# --- alphaedit --------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_alphaedit_spares_preserved_keys(models, corpus_file: Path, name: str) -> None:
    """K₀ = the corpus keys C is built from (N tokens, C = K₀K₀ᵀ/N). The rows of ΔW lie in range(P), so
    ‖ΔW K₀‖²/‖ΔW‖² ≤ N · nullspace_threshold: the paper's guarantee. With the threshold at the bottom 5% of
    C's spectrum, the ratio is below MEMIT's for the same request. It is NOT orders of magnitude below:
    MEMIT's rows ∝ C⁻¹k already favour C's smallest directions, and these C have no spectral gap
    (eigenvalues spread smoothly over ~4 decades), so there is no true null space to hide in."""
    bundle, case = models[name], CASES[2]
    texts, _ = load_corpus(str(corpus_file))
    hp = _hparams("memit", bundle, corpus_file)
    memit = get_editor("memit")(bundle, hp)
    d_memit = _apply_and_restore(bundle, memit, [case])
    layer = memit.layers[0]
    eig = torch.linalg.eigvalsh(_cov(bundle, layer, hp))
    threshold = float(eig[len(eig) // 20])
    alpha = get_editor("alphaedit")(bundle, _hparams("alphaedit", bundle, corpus_file, nullspace_threshold=threshold))
    d_alpha = _apply_and_restore(bundle, alpha, [case])
    k0 = _corpus_keys(bundle, layer, texts[: hp["mom2_n_samples"]], hp["mom2_max_len"])
    assert _rel(k0 @ k0.T / k0.shape[1], _cov(bundle, layer, hp)) < 1e-5  # the same keys as C
    ratio_memit = float((d_memit[layer] @ k0).norm() / d_memit[layer].norm())
    ratio_alpha = float((d_alpha[layer] @ k0).norm() / d_alpha[layer].norm())
    assert ratio_alpha <= (k0.shape[1] * threshold) ** 0.5 * (1 + 1e-6)
    assert ratio_alpha < ratio_memit
    p = alpha.projector(layer)
    assert _rel(d_alpha[layer] @ p, d_alpha[layer]) < 1e-6  # rows of ΔW lie in range(P)


def test_alphaedit_update_formula_and_memory(models, corpus_file: Path) -> None:
    """ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + L2 I)⁻¹ (paper eq. 14); K_p accumulates across applies, undo clears it."""
    bundle = models["tiny-llama"]
    hp = _hparams("alphaedit", bundle, corpus_file)
    editor = get_editor("alphaedit")(bundle, hp)
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    editor.apply(CASES[:2])
    previous = {layer: editor._previous[layer].clone() for layer in editor.layers}
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
def test_batch_of_ten_and_bitwise_restore(models, corpus_file: Path, name: str, editor_name: str) -> None:
    bundle = models[name]
    editor = get_editor(editor_name)(bundle, _hparams(editor_name, bundle, corpus_file))
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


def test_bad_hyperparameters(models, corpus_file: Path) -> None:
    bundle = models["tiny-gpt2"]
    for bad in ([], [2, 1], [1, 1], [7]):
        with pytest.raises(EditorError):
            get_editor("memit")(bundle, _hparams("memit", bundle, corpus_file, layers=bad))
    hp = _hparams("alphaedit", bundle, corpus_file, nullspace_threshold=0.0)
    with pytest.raises(EditorError, match="nullspace_threshold"):
        get_editor("alphaedit")(bundle, hp).apply(CASES[:1])
    with pytest.raises(EditorError, match="required"):
        get_editor("alphaedit")(bundle, {k: v for k, v in hp.items() if k != "nullspace_threshold"})
