"""The logit lens (bench/lens.py) against a hand computation, and its per-editor summary."""

from __future__ import annotations

import json

import pytest
import torch

from bench.lens import case_lens, first_layer_in_top, lens_summary
from bench.tracing import subject_token_range
from lmview.tokens import prompt_ids, target_ids

PROMPT, SUBJECT, TRUE, NEW = "The capital of France is", "France", "Paris", "Rome"


def hand_norm(model, family: str, x: torch.Tensor) -> torch.Tensor:
    """The final norm written out: LayerNorm (GPT-2) or RMSNorm (Llama)."""
    if family == "gpt2":
        ln = model.transformer.ln_f
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + ln.eps) * ln.weight + ln.bias
    norm = model.model.norm
    return x / torch.sqrt(x.pow(2).mean() + norm.variance_epsilon) * norm.weight


@pytest.mark.parametrize("layer", [1, 2])
def test_one_layer_rank_and_prob_match_a_manual_residual_norm_unembed(tiny_model, one_thread, layer):
    model, tok, arch = tiny_model.model, tiny_model.tokenizer, tiny_model.arch
    ids = torch.tensor([prompt_ids(tok, PROMPT)], device=tiny_model.device)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1]  # after block `layer`
        logits = hand_norm(model, arch.family, hidden) @ model.get_output_embeddings().weight.T
    probs = logits.softmax(-1)
    lens = case_lens(model, arch, tok, PROMPT, SUBJECT, TRUE, NEW)
    for key, target in (("new", NEW), ("true", TRUE)):
        token = target_ids(tok, target)[0]
        assert lens[f"{key}_rank"][layer] == 1 + int((logits > logits[token]).sum())
        assert lens[f"{key}_prob"][layer] == pytest.approx(float(probs[token]), rel=1e-3)
    assert len(lens["new_rank"]) == arch.n_layers


def test_last_layer_is_the_models_output_and_attention_is_the_eager_pattern(tiny_model, one_thread):
    model, tok, arch = tiny_model.model, tiny_model.tokenizer, tiny_model.arch
    ids = torch.tensor([prompt_ids(tok, PROMPT)], device=tiny_model.device)
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        model.config._attn_implementation = old
    lens = case_lens(model, arch, tok, PROMPT, SUBJECT, TRUE, NEW)
    token = target_ids(tok, NEW)[0]
    assert lens["new_prob"][-1] == pytest.approx(float(out.logits[0, -1].softmax(-1)[token]), rel=1e-3)
    start, end = subject_token_range(tok, PROMPT, SUBJECT)
    if out.attentions:  # the bridge, once booted, wraps the attention modules and keeps its own pattern
        expected = out.attentions[1][0, :, -1, start:end].sum(-1)
        assert lens["subject_attention"][1] == pytest.approx(expected.tolist(), abs=1e-3)
    assert len(lens["subject_attention"]) == arch.n_layers and len(lens["subject_attention"][0]) == arch.n_heads


def test_subject_attention_reads_the_last_occurrence_of_the_subject(tiny_model):
    tok = tiny_model.tokenizer
    prompt = "France is in Europe. The capital of France is"
    first, last = subject_token_range(tok, prompt, SUBJECT), subject_token_range(tok, prompt, SUBJECT, last=True)
    assert last[0] > first[0] and last[1] - last[0] == first[1] - first[0]


def lens_row(new_rank_pre, new_rank_post, prob_post, attention=None):
    layers = len(new_rank_pre)
    pre = {"new_rank": new_rank_pre, "new_prob": [0.0] * layers, "true_rank": [1] * layers,
           "true_prob": [0.5] * layers, "subject_attention": attention}
    post = dict(pre, new_rank=new_rank_post, new_prob=prob_post)
    return {"status": "ok", "lens_pre": pre, "lens_post": post}


def test_lens_summary_by_hand():
    rows = [lens_row([500, 300, 40], [400, 8, 1], [0.0, 0.1, 0.9], [[0.1, 0.7], [0.2, 0.0], [0.3, 0.3]]),
            lens_row([900, 50, 12], [600, 30, 2], [0.0, 0.0, 0.5], [[0.1, 0.5], [0.4, 0.0], [0.1, 0.1]]),
            lens_row([100, 90, 80], [200, 20, 9], [0.2, 0.2, 0.3], [[0.1, 0.3], [0.0, 0.0], [0.2, 0.2]]),
            {"status": "failed"}]
    s = lens_summary(rows, k=10, n_heads=2)
    assert s["n_cases"] == 3 and s["n_layers"] == 3
    assert s["post_new_rank_median"] == [400, 20, 2]
    assert s["post_new_prob_mean"] == pytest.approx([0.2 / 3, 0.1, 1.7 / 3])
    assert s["post_new_first_top_layer"] == 2  # the median curve: 400, 20, 2
    assert s["pre_new_first_top_layer"] is None  # median pre: 500, 90, 40
    # per case: layers 1, 2, 2 -> median 2, every case gets there
    assert s["post_new_first_top_layer_case_median"] == 2 and s["post_new_reaches_top_share"] == 1.0
    # mean pre attention [L][H]: (0.1,0.5),(0.2,0.0),(0.2,0.2): the top two heads are L0H1 and then L1H0/L2x ties
    assert s["mover_heads"][0] == "L0H1" and s["mover_attention_pre"][0] == pytest.approx(0.5)
    assert first_layer_in_top([50, 11, 10, 3]) == 2


def test_a_tiny_run_stores_both_lenses_and_the_leaderboard_plots_them(tmp_path, monkeypatch, one_thread):
    from bench.cli import main

    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    assert main(["run", "--editor", "ft-l", "--model", "tiny-llama", "--n", "2", "--all-cases", "--output",
                 str(out), "--no-circuits", "--ppl-texts", "0", "--device", "cpu"]) == 0
    (run_dir,) = out.iterdir()
    rows = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert all(len(r["lens_pre"]["new_rank"]) == 4 and len(r["lens_post"]["true_prob"]) == 4 for r in rows)
    assert all(len(r["lens_post"]["subject_attention"][0]) == 4 for r in rows)
    plots, md = tmp_path / "plots", tmp_path / "LB.md"
    assert main(["leaderboard", "--runs", str(out), "--plots", str(plots), "--output", str(md)]) == 0
    assert any(p.name.endswith("__logit_lens.png") for p in plots.iterdir())
    assert "#### Logit lens" in md.read_text()
