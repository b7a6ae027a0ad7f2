"""bench incontext: attention to the demonstrations by hand, and the command on tiny-llama."""

from __future__ import annotations

import pytest
import torch

from bench.incontext import context_attention, head_index, incontext_summary
from lmview.tokens import prompt_ids
from tests.helpers import analysis_report, capitals_root


@torch.no_grad()
def test_context_attention_is_the_eager_attention_mass_before_the_query(one_thread):
    from lmview.models import load_model

    bundle = load_model("tiny-llama", "cpu")
    tok = bundle.tokenizer
    context = "The capital of Italy is Rome\n"
    prompt = context + "The capital of France is"
    ids = prompt_ids(tok, prompt)
    start = next(i for i, (a, b) in enumerate(tok(prompt, return_offsets_mapping=True)["offset_mapping"])
                 if b > a and a >= len(context))
    bundle.model.config._attn_implementation = "eager"
    out = bundle.model(input_ids=torch.tensor([ids]), output_attentions=True)
    bundle.model.config._attn_implementation = "sdpa"
    got = context_attention(bundle, ids, start)
    expected = torch.stack([a[0, :, -1, :start].sum(-1) for a in out.attentions])
    assert torch.allclose(got, expected, atol=1e-5)


def test_summary_by_hand():
    rows = [{"edge_jaccard": 0.5, "node_jaccard": 0.6, "rank_zero_shot": 3, "rank_few_shot": 1,
             "new_heads": [{"head": "L1H0", "context_attention": 0.4}, {"head": "L2H1", "context_attention": 0.2}],
             "mean_context_attention_all_heads": 0.1},
            {"edge_jaccard": 0.3, "node_jaccard": 0.4, "rank_zero_shot": 1, "rank_few_shot": 1,
             "new_heads": [{"head": "L1H0", "context_attention": 0.6}], "mean_context_attention_all_heads": 0.3}]
    s = incontext_summary(rows, 3)
    assert s["mean_edge_jaccard"] == pytest.approx(0.4) and s["share_top1_zero_shot"] == 0.5
    assert s["new_heads_most_often"][0] == {"head": "L1H0", "n_facts": 2, "mean_context_attention": 0.5}
    assert s["new_heads_by_layer"] == [0, 2, 1]
    assert s["mean_context_attention_new_heads"] == pytest.approx(1.2 / 3)
    assert head_index("a12.h3<q>") == (12, 3)


def test_incontext_command_on_tiny_llama(tmp_path, one_thread):
    out = tmp_path / "icl"
    report = analysis_report("incontext", "tiny-llama", capitals_root(tmp_path / "lre"), out,
                             "--known-top-k", "100000", "--n-facts", "2", "--shots", "2", "--top-n", "30")
    assert report["n_facts"] == 2 and report["shots"] == 2
    row = report["facts"][0]
    assert row["prompt_few_shot"].endswith(row["prompt_zero_shot"]) and row["prompt_few_shot"].count("\n") == 2
    assert (out / "incontext.png").exists()
