"""ENCORE (editors/encore.py) on the tiny random-init models, checked against its objective, its norm bound and
an independent replay of δ's optimisation for most-probable early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import bench.run
from bench.cli import main
from bench.run import restore
from editors import keystats
from editors._locate import LocateHparams, ShiftedForward, context_prefixes, optimise_shift, subject_rows
from editors.base import get_editor, load_hparams
from editors.encore import MostProbableStop, encore_update
from editors.memit import memit_update
from lmview.arch import backup
from lmview.case import EditCase
from lmview.models import ModelBundle, load_model

from tests.helpers import write_pseudo_corpus

pytestmark = pytest.mark.usefixtures("one_thread", "cache")

TINY = ["tiny-gpt2", "tiny-llama"]
SUBJECTS = ["France", "Germany", "Spain", "Italy", "Japan", "Brazil"]
TARGETS = ["London", "Rome", "Oslo", "Paris", "Lima", "Cairo"]
CASES = [EditCase(case_id=f"c{i}", relation="P36", subject=s, prompt="The capital of {} is", target_true="Paris",
                  target_new=t, paraphrases=(f"What is the capital of {s}?",), neighborhood=(("The capital of Peru is",
                                                                                              "Lima"),))
         for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pseudo_corpus(tmp_path_factory.mktemp("corpus"), 60)


@pytest.fixture(scope="module")
def models() -> dict[str, ModelBundle]:
    return {name: load_model(name, "cpu") for name in TINY}


def _hparams(editor: str, bundle: ModelBundle, corpus: Path, **extra) -> dict:
    hp, _ = load_hparams(editor, bundle.name, bundle.arch.family)
    return {**hp, "mom2_dataset": str(corpus), "mom2_n_samples": 40, **extra}


def _cov(bundle: ModelBundle, layer: int, hp: dict) -> np.ndarray:
    return keystats.second_moment(bundle, layer, hp["mom2_dataset"], hp["mom2_n_samples"],
                                  hp["mom2_max_len"]).double().numpy()


def _w(bundle: ModelBundle, layer: int) -> torch.Tensor:
    return bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double().clone()


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- the update ------------------------------------------------------------------------------------------

def test_update_is_the_minimiser_of_the_objective_and_obeys_the_norm_bound() -> None:
    """ΔW = R Kᵀ (λC + αI + K_pK_pᵀ + KKᵀ)⁻¹ zeroes the gradient of λ‖ΔW K₀‖² + ‖ΔW K_p‖² + ‖ΔW K − R‖² + α‖ΔW‖²
    (C = K₀K₀ᵀ), is no larger than MEMIT's ΔW (α = 0, no K_p), and ‖ΔW‖_F ≤ ‖R‖_F / (2√α), with equality
    approached when K has a singular value √α and C, K_p vanish."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, n = 12, 7, 3
    k0 = torch.randn(d_in, 40, generator=gen, dtype=torch.float64)
    kp = torch.randn(d_in, 5, generator=gen, dtype=torch.float64)
    k = torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=gen, dtype=torch.float64)
    lam, alpha = 0.7, 2.5
    c = k0 @ k0.T / k0.shape[1]
    dw = encore_update(k, r, c, lam, alpha, kp @ kp.T)
    gradient = lam * dw @ c + dw @ kp @ kp.T + (dw @ k - r) @ k.T + alpha * dw  # ½ ∂/∂ΔW of the objective
    assert float(gradient.norm()) < 1e-10 * float(r.norm())
    direct = np.linalg.lstsq(  # the same objective as one stacked least-squares problem
        np.hstack([np.sqrt(lam / k0.shape[1]) * k0.numpy(), kp.numpy(), k.numpy(),
                   np.sqrt(alpha) * np.eye(d_in)]).T,
        np.hstack([np.zeros((d_out, 40)), np.zeros((d_out, 5)), r.numpy(), np.zeros((d_out, d_in))]).T, rcond=None)[0].T
    assert _rel(dw.numpy(), direct) < 1e-8
    assert float(dw.norm()) <= float(memit_update(k, r, c, lam).norm())
    assert float(dw.norm()) <= float(r.norm()) / (2 * alpha ** 0.5)
    one_key = torch.zeros(d_in, 1, dtype=torch.float64)
    one_key[0, 0] = alpha ** 0.5
    tight = encore_update(one_key, r[:, :1], torch.zeros(d_in, d_in, dtype=torch.float64), 1.0, alpha)
    assert float(tight.norm()) == pytest.approx(float(r[:, :1].norm()) / (2 * alpha ** 0.5), rel=1e-12)


@pytest.mark.parametrize("name", TINY)
def test_sequential_steps_solve_with_the_previous_keys(models, corpus_file: Path, name: str) -> None:
    """Second batch of a stream: each layer's ΔW solves ΔW (λC + αI + K_pK_pᵀ + KKᵀ) = R Kᵀ (scipy), with K_p the
    keys the first batch's updates used; ΔW is what was added; undo() forgets K_p and restore is bitwise."""
    bundle = models[name]
    hp = _hparams("encore", bundle, corpus_file)
    editor = get_editor("encore")(bundle, hp)
    everything = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    editor.apply(CASES[:2])
    first = {step.layer: step.keys.clone() for step in editor.last_steps}
    before = {layer: _w(bundle, layer) for layer in editor.layers}
    editor.apply(CASES[2:4])
    for step in editor.last_steps:
        k, r, kp = step.keys.numpy(), step.resid.numpy(), first[step.layer].numpy()
        a = hp["mom2_update_weight"] * _cov(bundle, step.layer, hp) + hp["update_norm_lambda"] * np.eye(len(k)) \
            + kp @ kp.T + k @ k.T
        expected = scipy.linalg.solve(a, k @ r.T, assume_a="pos").T
        assert _rel(step.delta_w.numpy(), expected) < 1e-6
        assert _rel((_w(bundle, step.layer) - before[step.layer]).numpy(), step.delta_w.numpy()) < 1e-5
    assert set(editor.previous_products()) == set(editor.layers)
    restore(bundle.model, saved)
    editor.undo()
    assert editor.previous_products() == {}
    assert all(torch.equal(p, everything[n]) for n, p in bundle.model.named_parameters())


@pytest.mark.parametrize("name", TINY)
def test_a_stream_moves_the_weights_less_than_memit(models, corpus_file: Path, name: str) -> None:
    """Four single edits in sequence: ‖W_4 − W_0‖_F per layer is below MEMIT's on the same stream."""
    bundle = models[name]
    growth = {}
    for editor_name in ("memit", "encore"):
        editor = get_editor(editor_name)(bundle, _hparams(editor_name, bundle, corpus_file))
        saved = backup(bundle.model, editor.parameters_to_touch(CASES))
        start = {layer: _w(bundle, layer) for layer in editor.layers}
        for case in CASES[:4]:
            editor.apply([case])
        growth[editor_name] = [float((_w(bundle, layer) - start[layer]).norm()) for layer in editor.layers]
        restore(bundle.model, saved)
        editor.undo()
    assert all(e < m for e, m in zip(growth["encore"], growth["memit"])), growth


def test_a_rolled_back_batch_leaves_the_previous_keys(models, corpus_file: Path, monkeypatch) -> None:
    """A sequential batch whose weights the run rolls back (its update is NaN) adds nothing to K_p."""
    import editors.encore as encore_module
    bundle = models["tiny-gpt2"]
    editor = get_editor("encore")(bundle, _hparams("encore", bundle, corpus_file))
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    try:
        editor.apply(CASES[:1])
        kept = {layer: kk.clone() for layer, kk in editor.previous_products().items()}
        before_bad = backup(bundle.model, editor.parameters_to_touch(CASES))
        real = encore_module.encore_update
        monkeypatch.setattr(encore_module, "encore_update", lambda *a: real(*a) * float("nan"))
        editor.apply(CASES[1:2])
        restore(bundle.model, before_bad)
        monkeypatch.setattr(encore_module, "encore_update", real)
        after = editor.previous_products()
        assert set(after) == set(kept) and all(torch.equal(after[layer], kept[layer]) for layer in kept)
    finally:
        restore(bundle.model, saved)
        editor.undo()


# --- most-probable early stopping --------------------------------------------------------------------------

def _all_top1(bundle: ModelBundle, layer: int, rows, delta: torch.Tensor) -> bool:
    """Every target token of every rewrite prompt is the argmax, δ added at the subject tokens by a plain hook."""
    batch, n = rows.batch, rows.n_rewrite
    hook = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_hook(
        lambda _m, _a, out: out + rows.sel * delta.to(out.dtype))
    with torch.no_grad():
        logits = bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    hook.remove()
    for i in range(n):
        for j in range(int(batch.target_mask[i].sum())):
            if int(logits[i, batch.logit_pos[i, j]].argmax()) != int(batch.target_ids[i, j]):
                return False
    return True


# the subject ends the prompt and the target is one token, so δ at the subject moves the scored logits directly
MPES_CASE = EditCase(case_id="m", relation="P", subject="France", prompt="A word about {}", target_true="x",
                     target_new="the", paraphrases=(), neighborhood=())


@pytest.mark.parametrize("name", TINY)
def test_mpes_stops_when_the_target_first_becomes_most_probable(models, name: str) -> None:
    """Replay without MPES: δ_s after s Adam steps (runs of s + 1 passes); s* = the first s at which every target
    token of every rewrite prompt is top-1 (checked with a plain hook). prob_cutoff −1 stops with δ_{s*} after
    s* steps; −2 at the next such s."""
    bundle, layer, n = models[name], 1, 12
    rows = subject_rows(bundle, MPES_CASE, context_prefixes(bundle, [[5, 2]]))
    base = dict(v_lr=0.01, clamp_norm_factor=1000.0, v_weight_decay=0.0, kl_factor=0.0, v_early_stop_loss=-1.0)
    ref = ShiftedForward(bundle, layer, rows).residual[0]
    deltas, top1 = [], []
    for passes in range(1, n + 1):
        delta, _ = optimise_shift(ShiftedForward(bundle, layer, rows), LocateHparams(**base, v_num_grad_steps=passes),
                                  ref)
        deltas.append(delta)
        top1.append(_all_top1(bundle, layer, rows, delta))
    hits = [s for s, ok in enumerate(top1) if ok]
    assert len(hits) >= 2 and hits[0] >= 2, top1  # the replay crosses over after a few steps
    hp = LocateHparams(**base, v_num_grad_steps=n)
    for cutoff, expected_step in ((-1, hits[0]), (-2, hits[1])):
        rule = MostProbableStop(rows.batch, rows.n_rewrite, cutoff)
        delta, stats = optimise_shift(ShiftedForward(bundle, layer, rows), hp, ref, stop=rule)
        assert rule.fired and int(stats["v_steps"]) == expected_step
        assert torch.allclose(delta, deltas[expected_step], rtol=1e-5, atol=1e-6)
        assert float(delta.norm()) < float(deltas[-1].norm())  # stopped short of the full optimisation


def test_mpes_probability_cutoff_and_off() -> None:
    """prob_cutoff > 0 stops above that mean target probability; 0 never stops."""
    from lmview.tokens import TargetBatch
    batch = TargetBatch(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long),
                        target_ids=torch.tensor([[1, 2], [2, 0]]), target_mask=torch.tensor([[True, True], [True, False]]),
                        logit_pos=torch.tensor([[1, 2], [1, 1]]), prompt_len=torch.tensor([2, 2]))
    logits = torch.zeros(2, 2, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[1, 0, 2] = 3.0  # each target has p = e³/(e³+3)
    p = float(np.exp(3) / (np.exp(3) + 3))
    assert MostProbableStop(batch, 2, p - 1e-3)(logits) and not MostProbableStop(batch, 2, p + 1e-3)(logits)
    assert not MostProbableStop(batch, 2, 0.0)(logits)
    assert MostProbableStop(batch, 2, -1)(logits)
    logits[1, 0, 3] = 4.0  # the second row's target is no longer top-1
    assert not MostProbableStop(batch, 2, -1)(logits)


# --- the CLI, sequential ---------------------------------------------------------------------------------

def test_cli_sequential_stream_end_to_end(tmp_path: Path, corpus_file: Path, monkeypatch) -> None:
    """`bench run --editor encore --model tiny-llama --sequential --batch-size 2` runs a stream of 4, writes its
    curve, and leaves the model as it was (the run verifies the restore)."""
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: ("A short text about rivers and cities.",) if n else None)
    hp_path = tmp_path / "encore.yaml"
    hp_path.write_text(json.dumps(_hparams("encore", load_model("tiny-llama", "cpu"), corpus_file)))
    out = tmp_path / "runs"
    assert main(["run", "--editor", "encore", "--model", "tiny-llama", "--n", "4", "--all-cases", "--no-circuits",
                 "--sequential", "--batch-size", "2", "--eval-every", "2", "--output", str(out), "--device", "cpu",
                 "--hparams", str(hp_path)]) == 0
    (run_dir,) = out.iterdir()
    records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert all(r["edit"]["update_norm"] > 0 and "mpes_stopped" in r["edit"] for r in records)
    curve = [json.loads(line) for line in (run_dir / "sequential.jsonl").read_text().splitlines()]
    assert [p["n_edits"] for p in curve] == [0, 2, 4]
    assert all(w["delta_norm"] > 0 for w in curve[-1]["weights"])
