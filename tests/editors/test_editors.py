"""ROME, FT-L and key statistics on the tiny random-init models (fast)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from editors import keystats
from editors.base import get_editor, load_hparams
from editors.rome import subject_last_index
from lmview.case import EditCase
from lmview.corpus import CorpusError, load_corpus
from lmview.models import ModelBundle, load_model
from lmview.tokens import build_batch, prompt_ids, target_logprobs

from tests.helpers import write_pseudo_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["tiny-gpt2", "tiny-llama"]
CASE = EditCase(case_id="t1", relation="P36", subject="France", prompt="The capital of {} is",
                target_true="Paris", target_new="London", paraphrases=(), neighborhood=())


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 pseudo-English paragraphs, enough tokens for a full-rank C on the tiny models."""
    return write_pseudo_corpus(tmp_path_factory.mktemp("corpus"), 60)


def _hparams(editor: str, bundle: ModelBundle, corpus: Path) -> dict:
    hp, _ = load_hparams(editor, bundle.name, bundle.arch.family)
    return {**hp, "mom2_dataset": str(corpus), "mom2_n_samples": 40}


def _logprob(bundle: ModelBundle, case: EditCase) -> float:
    with torch.no_grad():
        batch = build_batch(bundle.tokenizer, [case.rewrite_prompt], [case.target_new], bundle.device)
        return float(target_logprobs(bundle.model, batch)[0])


# --- corpus ------------------------------------------------------------------

def test_load_corpus_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one two\nthree\n\n\nfour\n")
    (tmp_path / "b.json").write_text(json.dumps(["x", " ", "y"]))
    (tmp_path / "c.jsonl").write_text('{"text": "p"}\n\n{"text": "q"}\n')
    assert load_corpus(str(tmp_path / "a.txt"))[0] == ["one two three", "four"]
    assert load_corpus(str(tmp_path / "b.json"))[0] == ["x", "y"]
    texts, identity = load_corpus(str(tmp_path / "c.jsonl"))
    assert texts == ["p", "q"] and identity.startswith("file:c.jsonl:")
    with pytest.raises(CorpusError):
        load_corpus(str(tmp_path / "missing.txt"))


# --- key statistics ------------------------------------------------------------

def _independent_moment(bundle: ModelBundle, texts: list[str], layer: int, max_len: int) -> torch.Tensor:
    """K K^T / N from a plain forward hook, one unpadded text at a time, in float64."""
    keys: list[torch.Tensor] = []
    proj = bundle.arch.mlp_out_proj(bundle.model, layer)
    handle = proj.register_forward_hook(lambda _m, args, _out: keys.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts:
            ids = bundle.tokenizer(text).input_ids[:max_len]
            bundle.model(input_ids=torch.tensor([ids], device=bundle.device))
    handle.remove()
    k = torch.cat(keys)
    return k.T @ k / len(k)


@pytest.mark.parametrize("name", TINY)
def test_second_moment_matches_independent(cache: Path, corpus_file: Path, name: str, monkeypatch) -> None:
    bundle = load_model(name, "cpu")
    texts = keystats.draw_sample(str(corpus_file), 12).texts
    assert texts != load_corpus(str(corpus_file))[0][:12]  # a random sample, not the first texts
    c = keystats.second_moment(bundle, 1, str(corpus_file), n_samples=12, max_len=32, batch_size=5)
    expected = _independent_moment(bundle, texts, 1, 32)
    assert c.shape == (bundle.arch.d_mlp, bundle.arch.d_mlp) and c.dtype == torch.float32
    assert torch.allclose(c.double(), expected, rtol=1e-4, atol=1e-7 * expected.abs().max())
    sidecars = list((cache / "stats").rglob("*n12-len32*.json"))
    n_tokens = sum(min(len(prompt_ids(bundle.tokenizer, t)), 32) for t in texts)
    assert any(json.loads(p.read_text())["n_tokens"] == n_tokens for p in sidecars)

    def boom(*_a, **_k):
        raise AssertionError("recomputed statistics despite a cache entry")

    with monkeypatch.context() as mp:  # second call: a cache hit, no forward passes
        mp.setattr(keystats, "_accumulate", boom)
        assert torch.equal(keystats.second_moment(bundle, 1, str(corpus_file), n_samples=12, max_len=32), c)
    before = set((cache / "stats").rglob("*.pt"))
    other = keystats.second_moment(bundle, 1, str(corpus_file), n_samples=6, max_len=32)
    assert len(set((cache / "stats").rglob("*.pt")) - before) == 1
    assert not torch.equal(other, c)


def test_key_sample_is_seeded_random_and_recorded(cache: Path, corpus_file: Path, monkeypatch) -> None:
    """rome layer_stats.py's sampler: the first n of a random.Random(seed) shuffle of the text indices. The record
    names the texts by hash; another seed is another sample and another cache entry; the tail is never drawn."""
    texts = load_corpus(str(corpus_file))[0]
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    sample = keystats.draw_sample(str(corpus_file), 12, seed=1)
    assert sample.texts == [texts[i] for i in order[:12]]
    digest = hashlib.sha256("\n".join(sorted(hashlib.sha256(t.encode()).hexdigest() for t in sample.texts))
                            .encode()).hexdigest()
    assert sample.record["texts_sha256"] == digest and sample.record["seed"] == 1 and sample.record["n_texts"] == 12
    other = keystats.draw_sample(str(corpus_file), 12, seed=2)
    assert set(other.texts) != set(sample.texts) and other.record["texts_sha256"] != digest

    bundle = load_model("tiny-gpt2", "cpu")
    first = keystats.second_moment(bundle, 1, str(corpus_file), n_samples=12, max_len=32, seed=1)
    before = set((cache / "stats").rglob("*.pt"))
    second = keystats.second_moment(bundle, 1, str(corpus_file), n_samples=12, max_len=32, seed=2)
    assert len(set((cache / "stats").rglob("*.pt")) - before) == 1 and not torch.equal(first, second)

    monkeypatch.setattr(keystats, "HELDOUT_TAIL", {str(corpus_file): 10})
    monkeypatch.setattr(keystats, "_SAMPLES", {})
    everything = keystats.draw_sample(str(corpus_file), 1000)
    assert sorted(everything.texts) == sorted(texts[:-10]) and everything.record["excluded_tail"] == 10

    hp = _hparams("rome", bundle, corpus_file)
    editor = get_editor("rome")(bundle, hp)  # the editor records how its C's texts were drawn
    assert editor.hparams["key_statistics_sample"] == keystats.draw_sample(str(corpus_file), 40).record
    assert "key_statistics_sample" not in hp  # the caller's mapping is left as given


# --- ROME -------------------------------------------------------------------------

def test_subject_last_index() -> None:
    bundle = load_model("tiny-gpt2", "cpu")
    text = "The capital of France is"
    idx = subject_last_index(bundle.tokenizer, text, text.index("France") + len("France"))
    ids = prompt_ids(bundle.tokenizer, text)
    assert bundle.tokenizer.decode(ids[: idx + 1]).endswith("France")
    assert not bundle.tokenizer.decode(ids[: idx]).endswith("France")


@pytest.mark.parametrize("name", TINY)
def test_rome_rank_one_update(cache: Path, corpus_file: Path, name: str) -> None:
    bundle = load_model(name, "cpu")
    hp = _hparams("rome", bundle, corpus_file)
    editor = get_editor("rome")(bundle, hp)
    layer = hp["layers"][0]
    assert editor.parameters_to_touch([CASE]) == [bundle.arch.mlp_out_weight_name(layer)]
    w0 = bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double().clone()
    lp_before = _logprob(bundle, CASE)

    outcome = editor.apply([CASE])
    assert outcome.layers == [layer]
    assert all(isinstance(v, (int, float)) for v in outcome.stats.values())
    step = editor.history[-1]
    k, v, k_star = step.key.double(), step.value.double(), step.k_star.double()
    w1 = bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double()

    # W' k_bare = v*
    assert (w1 @ k - v).norm() / v.norm() < 1e-3
    # rank one
    s = torch.linalg.svdvals(w1 - w0)
    assert s[1] / s[0] < 1e-5
    # ROME's code recomputed from C, k*, k_bare, δ with an explicit inverse
    c = keystats.second_moment(bundle, layer, hp["mom2_dataset"], hp["mom2_n_samples"], hp["mom2_max_len"]).double()
    u = torch.linalg.inv(c) @ k_star
    expected = torch.outer(step.delta.double(), u) / (u @ k)
    assert (w1 - w0 - expected).norm() / expected.norm() < 1e-3
    assert _logprob(bundle, CASE) > lp_before


def test_rome_identity_covariance(cache: Path) -> None:
    bundle = load_model("tiny-llama", "cpu")
    hp, _ = load_hparams("rome", bundle.name, bundle.arch.family)
    editor = get_editor("rome")(bundle, {**hp, "mom2_adjustment": False})
    w0 = bundle.arch.mlp_out_matrix(bundle.model, 1).detach().double().clone()
    editor.apply([CASE])
    step = editor.history[-1]
    k_bare, k_star = step.key.double(), step.k_star.double()
    expected = torch.outer(step.delta.double(), k_star) / (k_star @ k_bare)
    w1 = bundle.arch.mlp_out_matrix(bundle.model, 1).detach().double()
    assert (w1 - w0 - expected).norm() / expected.norm() < 1e-3


# --- FT-L ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_ft_constrained(cache: Path, name: str) -> None:
    bundle = load_model(name, "cpu")
    hp, _ = load_hparams("ft-l", bundle.name, bundle.arch.family)
    editor = get_editor("ft-l")(bundle, hp)
    names = editor.parameters_to_touch([CASE])
    params = dict(bundle.model.named_parameters())
    originals = {n: params[n].detach().clone() for n in names}
    outcome = editor.apply([CASE])
    for n in names:
        assert (params[n] - originals[n]).abs().max() <= hp["norm_constraint"] + 1e-6
        assert not params[n].requires_grad
    assert outcome.stats["loss_final"] < outcome.stats["loss_initial"]
    assert outcome.stats["max_abs_change"] > 0
