"""Causal tracing (bench/tracing.py, `python -m bench trace`) on fresh tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from bench.tracing import (CATEGORIES, KINDS, FactTrace, average_by_category, category_rows, clean_states,
                           embedding_noise_std, last_subject_curve, restored_probs, subject_token_range, trace_fact,
                           window_layers)
from lmview.models import load_model
from lmview.tokens import prompt_ids, target_ids

PROMPT, SUBJECT, ANSWER = "The capital city of New Zealand is", "New Zealand", "Wellington"


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def fresh(request):
    """A model no other test has bridged: tracing hooks the plain Hugging Face modules."""
    return load_model(request.param, device="cpu")


def setup(bundle, samples: int = 3, std: float = 0.5):
    ids = torch.tensor(prompt_ids(bundle.tokenizer, PROMPT))
    answer = target_ids(bundle.tokenizer, ANSWER)[0]
    span = subject_token_range(bundle.tokenizer, PROMPT, SUBJECT)
    noise = torch.randn(samples, span[1] - span[0], bundle.arch.d_model, generator=torch.Generator().manual_seed(1)) * std
    clean, p_clean = clean_states(bundle.model, bundle.arch, ids, answer, KINDS)
    return ids, answer, span, noise, clean, p_clean


def test_subject_token_range_covers_the_subject(fresh):
    start, end = subject_token_range(fresh.tokenizer, PROMPT, SUBJECT)
    ids = prompt_ids(fresh.tokenizer, PROMPT)
    assert 0 < start < end < len(ids)
    assert fresh.tokenizer.decode(ids[start:end]).strip() == SUBJECT
    with pytest.raises(ValueError):
        subject_token_range(fresh.tokenizer, PROMPT, "Australia")


def test_restoring_every_hidden_state_gives_the_clean_probability(fresh):
    ids, answer, span, noise, clean, p_clean = setup(fresh)
    everything = tuple(("hidden", layer, token) for layer in range(fresh.arch.n_layers) for token in range(len(ids)))
    last_only = (("hidden", fresh.arch.n_layers - 1, len(ids) - 1),)
    probs = restored_probs(fresh.model, fresh.arch, ids, answer, span, noise, clean, [everything, last_only, ()])
    assert torch.allclose(probs[:2], torch.full_like(probs[:2], p_clean), rtol=1e-5, atol=0)
    assert not torch.allclose(probs[2], torch.full_like(probs[2], p_clean), rtol=1e-3, atol=0)


def test_no_restore_gives_the_corrupted_probability(fresh):
    """Independent corruption: add the noise to inputs_embeds by hand."""
    ids, answer, span, noise, clean, _ = setup(fresh)
    probs = restored_probs(fresh.model, fresh.arch, ids, answer, span, noise, clean, [()])[0]
    with torch.no_grad():
        embeds = fresh.model.get_input_embeddings()(ids)[None].repeat(noise.shape[0], 1, 1)
        embeds[:, span[0]:span[1]] += noise
        expected = fresh.model(inputs_embeds=embeds).logits[:, -1].softmax(-1)[:, answer]
    assert torch.allclose(probs, expected, rtol=1e-5, atol=0)


def test_trace_fact_invariants(fresh):
    trace = trace_fact(fresh.model, fresh.arch, fresh.tokenizer, PROMPT, SUBJECT, ANSWER, noise_std=0.5, samples=3,
                       window=3)
    n_tokens, n_layers = len(trace.tokens), fresh.arch.n_layers
    start, end = trace.subject_range
    for kind in KINDS:
        effects = torch.tensor(trace.effects[kind])
        assert effects.shape == (n_tokens, n_layers)
        # tokens before the subject never see the noise (up to the rounding of a differently sized batch)
        assert torch.allclose(effects[:start], torch.zeros(()), atol=1e-9), kind
    hidden = torch.tensor(trace.effects["hidden"])
    assert hidden[-1, -1].item() == pytest.approx(trace.p_clean - trace.p_corrupted, rel=1e-4)
    # the last block's output at the subject feeds nothing
    assert torch.allclose(hidden[start:end, -1], torch.zeros(()), atol=1e-9)
    assert trace.p_clean != trace.p_corrupted


def test_window_layers():
    assert window_layers(5, 10, 30) == range(0, 10)
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(5, 5, 30) == range(3, 8)
    assert window_layers(2, 1, 4) == range(2, 3)


def test_noise_level_is_three_embedding_stds(fresh):
    texts = ["Rivers and mountains.", "The capital of France is Paris."]
    ids = [i for t in texts for i in prompt_ids(fresh.tokenizer, t)]
    expected = 3 * fresh.model.get_input_embeddings().weight[ids].std().item()
    assert embedding_noise_std(fresh.model, fresh.tokenizer, texts) == pytest.approx(expected, rel=1e-6)


def hand_trace(effects: list[list[float]], subject_range: tuple[int, int]) -> FactTrace:
    tokens = [f"t{i}" for i in range(len(effects))]
    return FactTrace("p", "s", "a", tokens, subject_range, 1.0, 0.0, {"mlp": effects})


def test_token_groups_and_last_subject_curve():
    # 7 tokens, 2 layers; subject = tokens 1..3
    rows = [[0, 0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]
    trace = hand_trace(rows, (1, 4))
    assert category_rows(trace, "mlp") == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]
    short = hand_trace([[0, 0], [2, 2], [4, 4]], (1, 2))  # one subject token, then the last token
    assert category_rows(short, "mlp") == [[2, 2], None, [2, 2], None, None, [4, 4]]
    averaged = average_by_category([trace, short], "mlp")
    assert len(averaged) == len(CATEGORIES)
    assert averaged[0] == [1.5, 2.0] and averaged[1] == [3, 4] and averaged[5] == [7.5, 8.0]
    assert last_subject_curve([trace, short], "mlp") == [3.5, 4.0]


def test_cli_trace_writes_json_and_pngs(tmp_path, monkeypatch):
    monkeypatch.setattr("lmview.corpus.wiki_texts", lambda: (["Some text about rivers.", "More text."], "fake"))
    out = tmp_path / "trace"
    assert main(["trace", "--model", "tiny-llama", "--prompt", PROMPT, "--subject", SUBJECT, "--answer", ANSWER,
                 "--samples", "2", "--window", "2", "--device", "cpu", "--output", str(out)]) == 0
    report = json.loads((out / "trace.json").read_text())
    (fact,) = report["facts"]
    start, end = fact["subject_range"]
    for kind in KINDS:
        assert (out / f"heatmap-{kind}.png").stat().st_size > 1000
        assert report["last_subject_by_layer"][kind] == pytest.approx(fact["indirect_effect"][kind][end - 1])
    assert (out / "last-subject-by-layer.png").stat().st_size > 1000
    assert report["noise_std"] > 0 and report["samples"] == 2


def test_cli_trace_bad_arguments_exit_2(capsys):
    assert main(["trace", "--model", "tiny-gpt2", "--prompt", PROMPT]) == 2
    assert "--prompt needs --subject and --answer" in capsys.readouterr().err
    assert main(["trace", "--model", "tiny-gpt2", "--kinds", "mlp,resid"]) == 2
    assert "unknown --kinds resid" in capsys.readouterr().err
