"""bench hallucination: where the right answer is lost (by hand), DLA decomposition of the logit
difference, and the command on tiny-gpt2."""

from __future__ import annotations

import pytest
import torch

from bench.hallucination import WrongFact, component_names, where_lost, wrong_vs_right_dla
from bench.heads import centred_unembedding, frozen_final_norm
from lmview.tokens import prompt_ids, target_ids
from tests.helpers import analysis_report, capitals_root


def test_where_lost_by_hand():
    # lens points a0 m0 a1 m1 a2 m2
    right = [500, 40, 3, 9, 300, 200]
    wrong = [100, 100, 50, 5, 1, 1]
    spots = where_lost(right, wrong)
    assert spots["peak"] == 2  # rank 3 after layer 1's attention
    assert spots["lost_at"] == 4  # log10(300) - log10(9) is the largest rise after the peak
    assert spots["overtaken_at"] == 3  # the wrong answer leads from m1 on
    assert where_lost([5, 4, 1], [9, 9, 9]) == {"peak": 2, "lost_at": None, "overtaken_at": None}
    assert component_names(2) == ["a0", "m0", "a1", "m1"]


@torch.no_grad()
def test_heads_mlps_and_embedding_sum_to_the_logit_difference(one_thread):
    """Llama has no biases: logit(wrong) − logit(right) = the embedding's + every head's + every MLP's DLA."""
    from lmview.models import load_model

    bundle = load_model("tiny-llama", "cpu")
    tok = bundle.tokenizer
    fact = WrongFact("r", "The capital of France is", "France", "Paris", target_ids(tok, "Rome")[0], " Rome")
    unembed = centred_unembedding(bundle)
    heads, mlps = wrong_vs_right_dla(bundle, fact, unembed)
    ids = torch.tensor([prompt_ids(tok, fact.prompt)])
    out = bundle.model(input_ids=ids, output_hidden_states=True)
    logits = out.logits[0, -1]
    right = target_ids(tok, "Paris")[0]
    final = {}
    hook = bundle.model.model.layers[-1].register_forward_hook(
        lambda _m, _i, o: final.update(h=(o[0] if isinstance(o, tuple) else o)[0, -1]))
    bundle.model(input_ids=ids)
    hook.remove()
    scale = torch.sqrt(final["h"].pow(2).mean() + bundle.model.model.norm.variance_epsilon)
    direction = unembed[fact.wrong_id] - unembed[right]
    embedding = frozen_final_norm(bundle, out.hidden_states[0][0, -1], scale) @ direction
    total = float(heads.sum() + mlps.sum() + embedding)
    assert total == pytest.approx(float(logits[fact.wrong_id] - logits[right]), abs=1e-3)


def test_hallucination_command_on_tiny_gpt2(tmp_path, one_thread):
    out = tmp_path / "h"
    report = analysis_report("hallucination", "tiny-gpt2", capitals_root(tmp_path / "lre"), out,
                             "--any-wrong", "--n-facts", "3", "--top-n", "20")
    assert report["n_facts"] == 3 and len(report["mean_log10_rank_right"]) == 8
    first = report["facts"][0]
    assert first["right_final_rank"] > 1 and first["right_rank"][-1] == first["right_final_rank"]
    assert sum(report["lost_at_counts"].values()) == sum(f["lost_at"] is not None for f in report["facts"])
    assert (out / "hallucination.png").exists()
