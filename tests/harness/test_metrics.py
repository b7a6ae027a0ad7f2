"""Tests for bench.metrics against hand computations and independent, unbatched re-implementations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import bench.metrics as metrics
from bench.metrics import (
    contains_target,
    easyedit_scores,
    fit_idf,
    generation_entropy,
    generation_metrics,
    greedy_generate,
    mean_generation_entropy,
    ngram_entropy,
    reference_score,
    teacher_forced_predictions,
    tfidf_cosine,
    token_accuracy,
)
from lmview.case import EditCase
from lmview.models import load_model

CASE = EditCase(
    case_id="c1", relation="r", subject="France", prompt="The capital of {} is",
    target_true="Paris", target_new="Rome", paraphrases=("France's capital city is", "In France, the capital is"),
    neighborhood=(("The capital of Germany is", "Berlin"), ("The capital of Japan is", "Tokyo Metropolis")),
    portability=(("The capital of France is located in the country of", "Italy"),),
)


# ---------------------------------------------------------------- hand computations


def test_token_accuracy_by_hand() -> None:
    assert token_accuracy([5, 6, 7], [5, 0, 7]) == pytest.approx(2 / 3)
    assert token_accuracy([1], [1]) == 1.0
    with pytest.raises(ValueError):
        token_accuracy([1, 2], [1])


def test_ngram_entropy_by_hand() -> None:
    words = ["a", "b", "a", "b"]
    # bigrams: (a,b) twice, (b,a) once -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3) = 0.918296 bits
    assert ngram_entropy(words, 2) == pytest.approx(0.9182958340544896)
    # trigrams: (a,b,a), (b,a,b) once each -> 1 bit
    assert ngram_entropy(words, 3) == pytest.approx(1.0)
    assert ngram_entropy(["a", "b"], 3) == 0.0
    # GE = mean(2/3 * H2, 4/3 * H3)
    assert generation_entropy("a b a b") == pytest.approx((2 / 3 * 0.9182958340544896 + 4 / 3 * 1.0) / 2)
    # a text that repeats one word has zero entropy; punctuation counts as words
    assert generation_entropy("the the the the the") == 0.0
    assert generation_entropy("x, x,") == pytest.approx(generation_entropy("a b a b"))  # words: x , x ,
    assert mean_generation_entropy(["a b a b", "the the the"]) == pytest.approx(generation_entropy("a b a b") / 2)


def test_tfidf_cosine_by_hand() -> None:
    idf = fit_idf(["the cat", "the dog", "the bird"])
    # N = 3: "the" in 3 documents -> ln(4/4) + 1 = 1; "cat" in 1 -> ln(4/2) + 1
    assert idf["the"] == pytest.approx(1.0)
    assert idf["cat"] == pytest.approx(math.log(2) + 1)
    w = math.log(2) + 1
    # "the cat" . "the dog": only "the" is shared; both vectors have norm sqrt(1 + w^2)
    assert tfidf_cosine("the cat", "the dog", idf) == pytest.approx(1 / (1 + w * w))
    assert tfidf_cosine("The CAT", "the cat", idf) == pytest.approx(1.0)
    assert tfidf_cosine("cat", "dog", idf) == 0.0
    # one-letter words and words outside the corpus vocabulary are dropped
    assert tfidf_cosine("a cat zebra", "cat", idf) == pytest.approx(1.0)
    assert reference_score(["the cat"], ["the", "dog"], idf) == pytest.approx(1 / (1 + w * w))


def test_contains_target() -> None:
    assert contains_target(" is Rome, the", "Rome")
    assert contains_target(" new   york city", "New York")
    assert not contains_target(" is Paris", "Rome")
    assert not contains_target(" anything", " ")


# ---------------------------------------------------------------- EasyEdit family on a model


def easyedit_accuracy_reference(bundle, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """EasyEdit's test_prediction_acc for one unpadded sequence: tokenise prompt + " " + answer jointly,
    take the argmax at positions prompt_len-1 .. end-1 and the labels at prompt_len .. end."""
    tok = bundle.tokenizer
    full = tok(prompt + " " + answer.strip(), return_tensors="pt").input_ids.to(bundle.device)
    prompt_len = len(tok(prompt).input_ids)
    with torch.no_grad():
        logits = bundle.model(input_ids=full).logits[0]
    answers = logits.argmax(-1).tolist()[prompt_len - 1: -1]
    labels = full[0].tolist()[prompt_len:]
    return answers, labels


def test_teacher_forced_matches_easyedit_unbatched(tiny_model) -> None:
    prompts = [CASE.rewrite_prompt, *CASE.paraphrases, *(p for p, _ in CASE.neighborhood)]
    answers = ["Rome", "Rome", "Rome", "Berlin", "Tokyo Metropolis"]
    batched = teacher_forced_predictions(tiny_model.model, tiny_model.tokenizer, prompts, answers, tiny_model.device,
                                         batch_size=2)
    for (pred, labels), prompt, answer in zip(batched, prompts, answers):
        assert (pred, labels) == easyedit_accuracy_reference(tiny_model, prompt, answer)


def test_easyedit_scores_pre_and_post(tiny_model) -> None:
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    pre, pre_tokens = easyedit_scores(model, tok, CASE, dev)
    assert set(pre) == {"reliability", "generalization", "portability"}  # locality needs the pre-edit tokens

    def acc(prompt: str, answer: str) -> float:
        return token_accuracy(*easyedit_accuracy_reference(tiny_model, prompt, answer))
    assert pre["reliability"] == pytest.approx(acc(CASE.rewrite_prompt, "Rome"))
    assert pre["generalization"] == pytest.approx(sum(acc(p, "Rome") for p in CASE.paraphrases) / 2)
    assert pre["portability"] == pytest.approx(acc(*CASE.portability[0]))
    same, _ = easyedit_scores(model, tok, CASE, dev, pre_tokens)
    assert same["locality"] == 1.0  # unchanged model: every locality token keeps its argmax

    # hand-made pre-edit tokens: the second locality answer's first token differs in one position
    assert len(pre_tokens[1]) >= 2
    altered = [pre_tokens[0], [pre_tokens[1][0] + 1, *pre_tokens[1][1:]]]
    partly, _ = easyedit_scores(model, tok, CASE, dev, altered)
    assert partly["locality"] == pytest.approx((1.0 + (len(altered[1]) - 1) / len(altered[1])) / 2)


def test_easyedit_locality_after_a_weight_change(tiny_model) -> None:
    """Locality against an independent count of unchanged argmax tokens, after a real weight change."""
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    pairs = CASE.locality_pairs
    _, pre_tokens = easyedit_scores(model, tok, CASE, dev)
    before = [easyedit_accuracy_reference(tiny_model, p, a)[0] for p, a in pairs]
    weight = tiny_model.arch.mlp_out_weight(model, model.config.num_hidden_layers - 1)
    saved = weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():  # moderate noise on the last MLP: some argmax tokens change, not all
            weight.add_(torch.randn(weight.shape, generator=generator).to(weight) * saved.std() * 3)
        post, _ = easyedit_scores(model, tok, CASE, dev, pre_tokens)
        after = [easyedit_accuracy_reference(tiny_model, p, a)[0] for p, a in pairs]
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    expected = sum(token_accuracy(a, b) for a, b in zip(after, before)) / len(pairs)
    assert post["locality"] == pytest.approx(expected)
    assert 0.0 < post["locality"] < 1.0


# ---------------------------------------------------------------- generation


def greedy_reference(bundle, prompt: str, steps: int) -> str:
    """Greedy decoding without a KV cache or padding: the whole sequence is re-run at every step."""
    ids = bundle.tokenizer(prompt, return_tensors="pt").input_ids.to(bundle.device)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            next_id = bundle.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return bundle.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_generate_batched_matches_reference(tiny_model) -> None:
    prompts = ["The capital of France is", "Hi", "The mother tongue of Danielle Darrieux is French and"]
    batched = greedy_generate(tiny_model.model, tiny_model.tokenizer, prompts, tiny_model.device, max_new_tokens=6)
    assert batched == [greedy_reference(tiny_model, p, 6) for p in prompts]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_greedy_generate_recomputes_when_a_hook_reads_the_sequence(name: str) -> None:
    """A hook that sees the whole sequence (as GRACE's and WISE's do) must not be fed one cached token per step;
    the bridge's wrapped modules do not take a cache either. A fresh model: the shared one may be wrapped."""
    tiny_model = load_model(name, "cpu")
    model, tok = tiny_model.model, tiny_model.tokenizer
    prompt, boosted = "The capital of France is", 7
    plain = greedy_generate(model, tok, [prompt], tiny_model.device, max_new_tokens=5)[0]
    with torch.no_grad():  # transformers leaves its output recorders on the modules; they must not count
        model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert any(m._forward_hooks for m in model.modules())
    assert not metrics.has_forward_hooks(model)

    def boost_after_seven_positions(_module, _args, output):
        logits = output.logits.clone()
        if logits.shape[1] > 7:  # only a full-sequence forward is this long
            logits[:, -1, boosted] += 1e4
        output.logits = logits
        return output

    handle = model.register_forward_hook(boost_after_seven_positions)
    try:
        assert metrics.has_forward_hooks(model)
        hooked = greedy_generate(model, tok, [prompt], tiny_model.device, max_new_tokens=5)[0]
        expected = greedy_reference(tiny_model, prompt, 5)
    finally:
        handle.remove()
    assert hooked == expected and hooked != plain and tok.decode([boosted]) in hooked
    tiny_model.bridge()
    assert metrics.has_forward_hooks(model)


def test_generation_metrics_success_entropy_and_reference(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    continuation = greedy_reference(tiny_model, CASE.rewrite_prompt, 8)
    word = continuation.split()[0]
    # target_new taken from the model's own greedy continuation: the rewrite prompt must succeed
    case = dataclasses.replace(CASE, target_new=word, paraphrases=("Zq",))
    scores, texts = generation_metrics(model, tok, case, dev, max_new_tokens=8)
    assert texts["rewrite"] == continuation and scores["generation_success_rewrite"] == 1.0
    paraphrase_hit = float(contains_target(greedy_reference(tiny_model, "Zq", 8), word))
    assert scores["generation_success_paraphrase"] == paraphrase_hit
    assert scores["generation_success"] == pytest.approx((1.0 + paraphrase_hit) / 2)
    full = [CASE.rewrite_prompt + continuation, "Zq" + texts["paraphrases"][0]]
    assert scores["generation_entropy"] == pytest.approx(mean_generation_entropy(full))
    assert "reference_score" not in scores and texts["entropy_prompts"] == "rewrite_and_paraphrases"

    # generation prompts, when present, are what GE and RS read; RS needs reference texts
    idf = fit_idf(["the capital city", "a river in the city", "rome is old"])
    monkeypatch.setattr(metrics, "corpus_idf", lambda: idf)
    gen_prompts = ("France is known for", "People in France")
    case = dataclasses.replace(case, generation_prompts=gen_prompts, reference_texts=("Rome is the capital city",))
    scores, texts = generation_metrics(model, tok, case, dev, max_new_tokens=8)
    free = [greedy_reference(tiny_model, p, 8) for p in gen_prompts]
    assert texts["generation_prompts"] == free and texts["entropy_prompts"] == "generation_prompts"
    full = [p + c for p, c in zip(gen_prompts, free)]
    assert scores["generation_entropy"] == pytest.approx(mean_generation_entropy(full))
    assert scores["reference_score"] == pytest.approx(tfidf_cosine(" ".join(full), "Rome is the capital city", idf))
