"""bench heads: per-head attention and source-decomposed DLA against a hand computation; classification."""

from __future__ import annotations

import pytest
import torch

from bench.heads import HeadRules, classify, fact_heads, read_heads
from bench.tracing import subject_token_range
from lmview.tokens import prompt_ids, target_ids
from tests.helpers import analysis_report, write_relation

PROMPT, SUBJECT, ANSWER = "The official language of France is", "France", "French"


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


@torch.no_grad()
def test_llama_head_dla_matches_a_manual_value_pattern_unembed_computation(one_thread):
    from lmview.models import load_model

    bundle = load_model("tiny-llama", "cpu")  # a fresh copy: HF's eager attention is read before any bridge
    model, tok, arch = bundle.model, bundle.tokenizer, bundle.arch
    ids = prompt_ids(tok, PROMPT)
    model.config._attn_implementation = "eager"
    out = model(input_ids=torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    model.config._attn_implementation = "sdpa"
    layer, head = 2, 3
    block = model.model.layers[layer]
    x = block.input_layernorm(out.hidden_states[layer][0])  # [T, d]
    kv = head // arch.heads_per_kv
    w_v = block.self_attn.v_proj.weight.reshape(arch.n_kv_heads, arch.d_head, arch.d_model)[kv]
    values = x @ w_v.T  # [T, d_head]
    pattern = out.attentions[layer][0, head, -1]  # [T]
    w_o = block.self_attn.o_proj.weight[:, head * arch.d_head:(head + 1) * arch.d_head]  # [d, d_head]
    parts = pattern[:, None] * (values @ w_o.T)  # [T, d]
    final = {}
    hook = model.model.layers[-1].register_forward_hook(lambda _m, _i, o: final.update(h=(o[0] if isinstance(o, tuple) else o)[0, -1]))
    model(input_ids=torch.tensor([ids]))
    hook.remove()
    rms = torch.sqrt(final["h"].pow(2).mean() + model.model.norm.variance_epsilon)
    w_u = model.lm_head.weight
    direction = (w_u[target_ids(tok, ANSWER)[0]] - w_u.mean(0)) * model.model.norm.weight / rms
    dla = parts @ direction  # [T]
    start, end = subject_token_range(tok, PROMPT, SUBJECT)
    got = fact_heads(bundle, PROMPT, SUBJECT, ANSWER)
    assert float(got.dla_subject[layer, head]) == pytest.approx(float(dla[start:end].sum()), abs=1e-4)
    rest = [i for i in range(len(ids)) if not start <= i < end]
    assert float(got.dla_relation[layer, head]) == pytest.approx(float(dla[rest].sum()), abs=1e-4)
    assert float(got.attention_subject[layer, head]) == pytest.approx(float(pattern[start:end].sum()), abs=1e-5)
    assert float(got.attention_relation[layer, head]) == pytest.approx(float(pattern[rest].sum()), abs=1e-5)


@torch.no_grad()
def test_heads_and_sources_sum_to_the_attention_output(tiny_model, one_thread):
    """Σ over heads and sources of the per-source parts is the attention block's output at END (less
    GPT-2's output bias)."""
    ids = prompt_ids(tiny_model.tokenizer, PROMPT)
    readout = read_heads(tiny_model, ids)
    _, cache = tiny_model.bridge().run_with_cache(torch.tensor([ids], device=tiny_model.device),
                                                names_filter=lambda n: n.endswith("hook_attn_out"))
    for layer in range(tiny_model.arch.n_layers):
        expected = cache[f"blocks.{layer}.hook_attn_out"][0, -1]
        if tiny_model.arch.family == "gpt2":
            expected = expected - tiny_model.model.transformer.h[layer].attn.c_proj.bias
        assert torch.allclose(readout.per_source[layer].sum((0, 1)), expected, atol=1e-5)
        ones = torch.ones(tiny_model.arch.n_heads, device=tiny_model.device)
        assert torch.allclose(readout.attention[layer].sum(-1), ones, atol=1e-5)


def test_classification_rules_by_hand():
    L, H = 2, 3
    z = torch.zeros(L, H)
    means = {"attention_subject": z.clone(), "attention_relation": z.clone(), "dla_subject": z.clone(),
             "dla_relation": z.clone(), "copies_subject": z.clone()}
    # L0H0: a mover by DLA; L0H1: a mover by copying only; L1H0: relation; L1H1: mixture; L1H2: too weak
    means["attention_subject"][0, 0], means["dla_subject"][0, 0] = 0.8, 2.0
    means["attention_subject"][0, 1], means["copies_subject"][0, 1] = 0.5, 0.6
    means["attention_relation"][1, 0], means["dla_relation"][1, 0] = 0.6, 1.0
    means["attention_subject"][1, 1], means["attention_relation"][1, 1] = 0.2, 0.2
    means["dla_subject"][1, 1], means["dla_relation"][1, 1] = 0.5, 0.5
    means["attention_relation"][1, 2], means["dla_relation"][1, 2] = 0.9, 0.1  # below the floor 0.1 × 2.0
    got = classify(means, HeadRules(min_attention=0.3, min_dla_fraction=0.1))
    assert got == {"mover": [(0, 0), (0, 1)], "relation": [(1, 0)], "mixture": [(1, 1)]}


@pytest.fixture
def lre_root(tmp_path):
    root = tmp_path / "lre"
    write_relation(root / "factual", "country_language", "The official language of {} is",
                   [("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish")])
    write_relation(root / "factual", "country_capital", "The capital of {} is",
                   [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome")])
    return root


def test_heads_command_writes_report_and_figures(lre_root, tmp_path, one_thread, capsys):
    from bench.cli import main

    out = tmp_path / "heads"
    report = analysis_report("heads", "tiny-gpt2", lre_root, out, "--known-top-k", "100000", "--n-facts", "3",
                             "--min-attention", "0.05")
    assert set(report["relations"]) == {"country_language", "country_capital"}
    lang = report["relations"]["country_language"]
    assert lang["n_facts"] == 3 and len(lang["per_head"]["attention_subject"]) == 4
    for cls, counts in lang["layer_distribution"].items():
        assert sum(counts) == len(lang["heads"][cls])
    assert (out / "heads-layers.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "heads-attention.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["heads", "--model", "tiny-gpt2", "--lre-root", str(lre_root), "--relations", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown relation 'nope'")
