"""UltraEdit (editors/ultraedit.py) on the tiny random-init models: its closed form against a direct ridge solve,
its running statistics against the mean and variance of every row seen, its feature rows against plain hooks,
and its lifelong state across a stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.run
from bench.cli import main
from bench.run import restore
from editors.base import EditorError, get_editor, load_hparams
from editors.ultraedit import EPS, RunningStats, ultraedit_update
from lmview.arch import backup
from lmview.case import EditCase
from lmview.models import ModelBundle, load_model
from lmview.tokens import build_batch

pytestmark = pytest.mark.usefixtures("one_thread", "cache")

TINY = ["tiny-gpt2", "tiny-llama"]
SUBJECTS = ["France", "Germany", "Spain", "Italy", "Japan", "Brazil", "Canada"]
TARGETS = ["London", "Rome", "Oslo", "Paris", "Lima", "Cairo", "Tokyo"]
CASES = [EditCase(case_id=f"c{i}", relation="P36", subject=s, prompt="The capital of {} is", target_true="Paris",
                  target_new=t, paraphrases=(f"What is the capital of {s}?",),
                  neighborhood=(("The capital of Peru is", "Lima"),))
         for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]


@pytest.fixture(scope="module")
def models() -> dict[str, ModelBundle]:
    return {name: load_model(name, "cpu") for name in TINY}


def _editor(bundle: ModelBundle, **extra):
    hp, _ = load_hparams("ultraedit", bundle.name, bundle.arch.family)
    return get_editor("ultraedit")(bundle, {**hp, **extra})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_closed_form_equals_a_direct_ridge_solve() -> None:
    """ΔW = (KᵀK + ρI)⁻¹KᵀV equals lstsq on [K; √ρ I] ΔW = [V; 0], with V = −lr‖k̂‖²ĝ standardised by the mean and
    unbiased std of all rows seen (computed here with torch.mean / torch.std)."""
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, lr, ridge = 9, 5, 0.3, 0.7
    seen = torch.randn(30, d_in + d_out, generator=gen, dtype=torch.float64) * 2 + 1
    keys = torch.randn(12, d_in, generator=gen, dtype=torch.float64)
    grads = torch.randn(12, d_out, generator=gen, dtype=torch.float64)
    stats = RunningStats.empty(d_in + d_out, torch.device("cpu")).merged(seen)
    rows = (torch.cat([keys, grads], -1) - seen.mean(0)) / (seen.std(0) + EPS)
    values = -lr * rows[:, :d_in].pow(2).sum(-1, keepdim=True) * rows[:, d_in:]
    augmented = torch.cat([keys, ridge ** 0.5 * torch.eye(d_in, dtype=torch.float64)])
    target = torch.cat([values, torch.zeros(d_in, d_out, dtype=torch.float64)])
    direct = torch.linalg.lstsq(augmented, target).solution
    assert _rel(ultraedit_update(keys, grads, stats, lr, ridge), direct) < 1e-7  # eps in (n − 1 + eps): ~4e-9


def test_running_statistics_by_hand() -> None:
    """Merging in chunks gives the mean and unbiased variance of all rows; `reference` adds B·var(chunk) instead of
    the chunk's scatter, as the authors' RunningMeanStd.update (written out here from their formula)."""
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randn(b, 4, generator=gen, dtype=torch.float64) + i for i, b in enumerate((5, 2, 7))]
    exact = reference = RunningStats.empty(4, torch.device("cpu"))
    n, mean, var = 0, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for x in chunks:
        exact, reference = exact.merged(x), reference.merged(x, reference=True)
        b, delta = x.shape[0], x.mean(0) - mean
        mean = mean + b * delta / (n + b)
        var = var + b * x.var(0) + n * b * delta.pow(2) / (n + b)
        n += b
    everything = torch.cat(chunks)
    assert exact.n == reference.n == 14
    assert torch.allclose(exact.mean, everything.mean(0), atol=1e-12)
    assert torch.allclose(exact.std, everything.std(0), rtol=1e-6)  # (n − 1 + eps) in the denominator
    assert torch.allclose(reference.mean, mean, atol=1e-12) and torch.allclose(reference.m2, var, rtol=1e-12)
    assert not torch.allclose(reference.std, exact.std, rtol=1e-3)


@pytest.mark.parametrize("name", TINY)
def test_feature_rows_are_keys_and_output_gradients(models, name: str) -> None:
    """For one chunk and one layer: the key rows are the projection's input at the positions that predict target
    tokens (a plain hook), and the gradient rows are ∂(mean answer-token cross-entropy)/∂(projection output),
    taken by replacing the output with a leaf tensor."""
    bundle, layer = models[name], 2
    editor = _editor(bundle, layers=[layer])
    chunk = CASES[:3]
    keys, grads, loss = editor.chunk_features(chunk)
    batch = build_batch(bundle.tokenizer, [c.rewrite_prompt for c in chunk], [c.target_new for c in chunk])
    seen = {}

    def swap(_m, args, out):
        seen["in"] = args[0].detach()
        seen["out"] = out.detach().requires_grad_(True)
        return seen["out"]

    handle = bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_hook(swap)
    logits = bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    handle.remove()
    terms, key_rows, positions = [], [], []
    for i in range(len(chunk)):
        for j in range(int(batch.target_mask[i].sum())):
            p = int(batch.logit_pos[i, j])
            terms.append(-logits[i, p].log_softmax(-1)[batch.target_ids[i, j]])
            key_rows.append(seen["in"][i, p])
            positions.append((i, p))
    expected_loss = torch.stack(terms).mean()
    (grad_out,) = torch.autograd.grad(expected_loss, seen["out"])
    assert loss == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    assert _rel(keys[layer], torch.stack(key_rows)) < 1e-6
    assert _rel(grads[layer], torch.stack([grad_out[i, p] for i, p in positions])) < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_a_stream_keeps_the_statistics_of_every_row_and_restores_bitwise(models, name: str) -> None:
    """Three batches in sequence: the statistics are the mean and variance of every feature row of every batch and
    edited layer so far; each ΔW is the closed form on that batch's rows and is what was added; undo() clears the
    statistics and restore is bitwise."""
    bundle = models[name]
    editor = _editor(bundle, grad_batch_size=2)
    everything = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    rows = []
    for cases in (CASES[:3], CASES[3:5], CASES[5:7]):
        before = {layer: bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double().clone()
                  for layer in editor.layers}
        outcome = editor.apply(cases)
        feats = editor.last_features
        rows += [torch.cat([feats.keys[layer], feats.grads[layer]], -1) for layer in editor.layers]
        stats = editor.statistics()
        everything_seen = torch.cat(rows)
        assert stats.n == everything_seen.shape[0] == outcome.stats["normaliser_rows"]
        assert torch.allclose(stats.mean, everything_seen.mean(0), atol=1e-9)
        assert torch.allclose(stats.std, everything_seen.std(0), rtol=1e-6, atol=1e-9)
        for layer in editor.layers:
            expected = ultraedit_update(feats.keys[layer], feats.grads[layer], stats, editor.hp.lr, editor.hp.ridge).T
            added = bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double() - before[layer]
            assert _rel(editor.last_deltas[layer], expected) < 1e-12 and _rel(added, expected) < 1e-5
            assert float(expected.norm()) > 0
    restore(bundle.model, saved)
    editor.undo()
    assert editor.statistics().n == 0
    assert all(torch.equal(p, everything[n]) for n, p in bundle.model.named_parameters())


def test_a_rolled_back_batch_leaves_the_statistics(models) -> None:
    """A batch whose weights the run restores (here by hand) is not counted in the statistics of the next batch."""
    bundle = models["tiny-llama"]
    editor = _editor(bundle)
    saved = backup(bundle.model, editor.parameters_to_touch(CASES))
    try:
        editor.apply(CASES[:2])
        kept = editor.statistics()
        before_bad = backup(bundle.model, editor.parameters_to_touch(CASES))
        editor.apply(CASES[2:4])
        restore(bundle.model, before_bad)  # the run rolls this batch back
        after = editor.statistics()
        assert after.n == kept.n and torch.equal(after.mean, kept.mean) and torch.equal(after.m2, kept.m2)
    finally:
        restore(bundle.model, saved)
        editor.undo()


def test_one_row_from_empty_statistics_edits_nothing(models) -> None:
    """One edited layer and a single feature row (one case, one-token answer, first batch): σ = 0, so k̂ = ĝ = 0 and
    ΔW = 0. With two layers the shared statistics hold two rows, and the edit is not empty."""
    bundle = models["tiny-llama"]
    editor = _editor(bundle, layers=[2])
    case = EditCase(case_id="one", relation="P", subject="France", prompt="A word about {}", target_true="x",
                    target_new="the", paraphrases=(), neighborhood=())
    saved = backup(bundle.model, editor.parameters_to_touch([case]))
    outcome = editor.apply([case])
    assert outcome.stats["feature_rows"] == 1 and outcome.stats["update_norm"] == 0.0
    restore(bundle.model, saved)
    editor.undo()
    two = _editor(bundle, layers=[1, 2])
    outcome = two.apply([case])
    assert outcome.stats["normaliser_rows"] == 2 and outcome.stats["update_norm"] > 0
    restore(bundle.model, saved)
    two.undo()


def test_bad_hyperparameters(models) -> None:
    bundle = models["tiny-gpt2"]
    with pytest.raises(EditorError, match="ridge must be positive"):
        _editor(bundle, ridge=0.0)
    with pytest.raises(EditorError, match="'token'"):
        _editor(bundle, token="prompt")


def test_cli_sequential_stream_end_to_end(tmp_path: Path, monkeypatch) -> None:
    """`bench run --editor ultraedit --model tiny-llama --sequential --batch-size 2` runs a stream of 4 cases,
    writes its curve, and leaves the model as it was (the run verifies the restore)."""
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: ("A short text about rivers and cities.",) if n else None)
    out = tmp_path / "runs"
    assert main(["run", "--editor", "ultraedit", "--model", "tiny-llama", "--n", "4", "--all-cases", "--no-circuits",
                 "--sequential", "--batch-size", "2", "--eval-every", "2", "--output", str(out),
                 "--device", "cpu"]) == 0
    (run_dir,) = out.iterdir()
    records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert [r["edit"]["normaliser_rows"] for r in records[::2]] == sorted({r["edit"]["normaliser_rows"] for r in records})
    curve = [json.loads(line) for line in (run_dir / "sequential.jsonl").read_text().splitlines()]
    assert [p["n_edits"] for p in curve] == [0, 2, 4]
    assert all(w["delta_norm"] > 0 for w in curve[-1]["weights"])
