"""IKE: demonstrations of other facts, retrieved from the dataset, never showing a scored prompt's answer."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from bench.corrupt import circuit_batch
from bench.data import load_dataset
from bench.metrics import GENERATION_MAX_NEW_TOKENS
from bench.run import RunConfig, run_case
from bench.scoring import case_target_nll, counterfact_scores
from editors.base import EditorError, get_editor, load_hparams
from editors.ike import GENERATED_TOKENS, Pool, pool_demonstrations, query_text, words
from lmview.case import EditCase
from lmview.models import load_model
from lmview.tokens import prompt_ids, target_ids

pytestmark = pytest.mark.usefixtures("one_thread", "cache")

POOL = ["France", "Chile", "Peru", "Kenya", "Nepal", "Norway", "Canada", "Brazil", "Mexico"]


@pytest.fixture(scope="module")
def facts() -> list[EditCase]:
    return load_dataset("facts:all").cases


def case_of(facts: list[EditCase], case_id: str) -> EditCase:
    return next(c for c in facts if c.case_id == case_id)


def ike(name: str, facts: list[EditCase], **overrides):
    bundle = load_model(name, "cpu")
    hp, _ = load_hparams("ike", bundle.name, bundle.arch.family)
    editor = get_editor("ike")(bundle, {**hp, **overrides})
    editor.observe_dataset(facts)
    return bundle, editor


def test_no_demonstration_shows_a_scored_prompt(facts) -> None:
    case = case_of(facts, "capital-france")
    pool = Pool.build(facts)
    every = "".join(pool.texts)
    leaked = [f"{p} {a}" for p, a in case.neighborhood if f"Prompt: {p} {a}" in every]
    assert leaked, "precondition: other records' retain demonstrations show this case's neighbours"
    demos = pool.nearest(case, k=len(pool.texts))
    assert 0 < len(demos) < len(pool.texts)
    text = "".join(demos)
    for prompt, answer in case.neighborhood:
        assert f"{prompt} {answer}" not in text and prompt not in text
    for prompt in (case.rewrite_prompt, *case.paraphrases):
        assert prompt not in text
    owners = {pool.owners[pool.texts.index(d)].case_id for d in demos}
    assert case.case_id not in owners
    assert all(case_of(facts, o).subject != case.subject for o in owners)


def test_pool_holds_copy_update_and_retain_demonstrations(facts) -> None:
    other = case_of(facts, "capital-germany")
    fact = f"The capital city of Germany is {other.target_new}"
    assert pool_demonstrations(other) == [
        f"New Fact: {fact}\nPrompt: {fact}\n\n",
        f"New Fact: {fact}\nPrompt: {other.paraphrases[0]} {other.target_new}\n\n",
        f"New Fact: {fact}\nPrompt: {other.neighborhood[0][0]} {other.neighborhood[0][1]}\n\n"]


def dense_cosine_ranking(texts: list[str], query: str) -> list[int]:
    """An independent TF-IDF (dense vectors over a sorted vocabulary), ranked by cosine, ties by index."""
    vocab = sorted({w for t in texts for w in words(t)})
    n = len(texts)
    df = [sum(w in set(words(t)) for t in texts) for w in vocab]
    idf = [math.log((1 + n) / (1 + d)) + 1 for d in df]

    def vec(text: str) -> list[float]:
        counts = Counter(words(text))
        raw = [counts[w] * i for w, i in zip(vocab, idf)]
        norm = math.sqrt(sum(x * x for x in raw))
        return [x / norm for x in raw]

    q = vec(query)
    sims = [sum(a * b for a, b in zip(q, vec(t))) for t in texts]
    return sorted(range(n), key=lambda i: (-sims[i], i))


def test_retrieval_is_tfidf_cosine(facts) -> None:
    records = [c for c in facts if c.relation in ("country_capital", "element_symbol", "city_country")][::3]
    case = records[0]
    pool = Pool.build(records)
    hidden = (case.rewrite_prompt, *case.paraphrases, *(q for q, _ in case.neighborhood))
    allowed = [i for i, (o, t) in enumerate(zip(pool.owners, pool.texts))
               if o.subject != case.subject and not any(p in t for p in hidden)]
    assert len(allowed) < len(pool.texts) - 3  # more left out than the case's own three
    query = query_text(f"{case.rewrite_prompt} {case.target_new}", case.rewrite_prompt) + "\n\n"
    expected = [i for i in dense_cosine_ranking(pool.texts, query) if i in allowed][:5]
    assert pool.nearest(case, 5) == [pool.texts[i] for i in expected]
    assert "capital" in pool.nearest(case, 1)[0]  # the lexically closest is a capital fact


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_scored_prompts_sit_behind_the_demonstrations_and_weights_stay(name: str, facts, tmp_path) -> None:
    bundle, editor = ike(name, facts, k=4)
    case = case_of(facts, "capital-france")
    edited = editor.evaluation_case(case)
    demos = "".join(editor.demonstrations(case))
    assert demos and edited.rewrite_prompt == demos + query_text(f"{case.rewrite_prompt} {case.target_new}",
                                                                  case.rewrite_prompt)
    for original, prefixed in zip(case.paraphrases, edited.paraphrases):
        assert prefixed.startswith(demos) and prefixed.endswith(f"Prompt: {original}")
    assert [a for _, a in edited.neighborhood] == [a for _, a in case.neighborhood]
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    record = run_case(bundle, editor, case, POOL, RunConfig(editor="ike", circuits=False, ppl_texts=0), tmp_path)
    assert record["status"] == "ok"
    assert all((p == before[n]).all() for n, p in bundle.model.named_parameters())
    expected = counterfact_scores(case_target_nll(bundle.model, bundle.tokenizer, edited, bundle.device))
    scalars = {key: value for key, value in expected.items() if isinstance(value, float)}
    assert {key: record["post"][key] for key in scalars} == pytest.approx(scalars, rel=1e-5, abs=1e-9)


def test_demonstrations_leave_room_for_the_generated_tokens(facts, tmp_path) -> None:
    """tiny-gpt2 has 256 positions and a byte-level tokenizer: 16 demonstrations overflow it."""
    assert GENERATED_TOKENS == GENERATION_MAX_NEW_TOKENS
    bundle, editor = ike("tiny-gpt2", facts)
    tok, limit = bundle.tokenizer, bundle.model.config.n_positions
    case = case_of(facts, "capital-france")
    assert len(prompt_ids(tok, "".join(editor.pool.nearest(case, editor.k)))) > limit  # precondition
    edited = editor.evaluation_case(case)
    prompts = [(edited.rewrite_prompt, case.target_new), *((p, case.target_new) for p in edited.paraphrases),
               *edited.neighborhood]
    for prompt, answer in prompts:
        assert len(prompt_ids(tok, prompt)) + max(GENERATED_TOKENS, len(target_ids(tok, answer))) <= limit
    record = run_case(bundle, editor, case, POOL, RunConfig(editor="ike", circuits=False, ppl_texts=0), tmp_path)
    assert record["status"] == "ok" and record["post_generation"] is not None


def test_corrupted_prompt_swaps_the_query_subject(facts) -> None:
    bundle, editor = ike("tiny-gpt2", facts, k=2)
    case = case_of(facts, "capital-france")
    edited = editor.evaluation_case(case)
    batch = circuit_batch(bundle.tokenizer, edited, case.target_new, POOL, "cpu", seed=0)
    assert batch is not None
    tok = bundle.tokenizer
    for clean, corrupt, mask in zip(batch.clean_ids, batch.corrupt_ids, batch.attention_mask):
        n = int(mask.sum())
        clean_text, corrupt_text = tok.decode(clean[:n]), tok.decode(corrupt[:n])
        head = clean_text.rsplit("Prompt:", 1)[0]
        assert corrupt_text.startswith(head)  # demonstrations and the new-fact line untouched
        assert "France" in clean_text.rsplit("Prompt:", 1)[1] and "France" not in corrupt_text.rsplit("Prompt:", 1)[1]


def test_bad_hyperparameters() -> None:
    bundle = load_model("tiny-gpt2", "cpu")
    with pytest.raises(EditorError, match="key 'k': -1 must be at least 0"):
        get_editor("ike")(bundle, {"k": -1})
    with pytest.raises(EditorError, match="key 'retrieval': 'sentence-transformers' is not one of 'tfidf'"):
        get_editor("ike")(bundle, {"retrieval": "sentence-transformers"})
