"""CounterFact scores as ROME computes them: by hand, from hand-made logits, and recomputed from a run folder."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from bench.cli import main
from bench.results import summarize
from bench.scoring import case_target_nll, counterfact_scores
from lmview.case import EditCase
from tests.helpers import SHARED_DATA, tiny_rome_hparams

SHARED_COUNTERFACT = SHARED_DATA / "counterfact" / "counterfact-val.json"

# --- a word-level tokenizer and a bigram "model" whose next-token probabilities are set by hand -------------

VOCAB = ["<pad>", "Alice", "lives", "in", "resides", "at", "works", "on", "Bob", "near", "Carol", "by", "Dan",
         "from", "New", "York", "City", "Paris", "Lyon", "France"]
ID = {w: i for i, w in enumerate(VOCAB)}

# next-token probabilities after a word; the rest of each row's mass is spread evenly over the vocabulary
NEXT = {
    "in": {"New": 0.5, "Paris": 0.3},     # rewrite: new 3 tokens at 0.5 each vs true 1 token at 0.3
    "at": {"New": 0.2, "Paris": 0.25},    # paraphrase 1: mean NLL prefers new, the summed log-prob true
    "on": {"New": 0.05, "Paris": 0.6},    # paraphrase 2: true wins either way
    "near": {"Lyon": 0.4, "New": 0.1},    # neighbour 1: its answer "Lyon France" wins either way
    "by": {"Lyon": 0.2, "New": 0.3},      # neighbour 2: the answer wins by mean NLL, barely
    "from": {"Lyon": 0.15, "New": 0.4},   # neighbour 3: mean NLL prefers new, the summed log-prob the answer
    "New": {"York": 0.5},
    "York": {"City": 0.5},
    "Lyon": {"France": 0.9},
}


class WordTokenizer:
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ID[w] for w in text.split()])


def bigram_table() -> torch.Tensor:
    table = torch.empty(len(VOCAB), len(VOCAB))
    for word in VOCAB:
        fixed = NEXT.get(word, {})
        rest = (1.0 - sum(fixed.values())) / (len(VOCAB) - len(fixed))
        row = torch.full((len(VOCAB),), rest)
        for target, p in fixed.items():
            row[ID[target]] = p
        table[ID[word]] = row.log()
    return table


class BigramModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = bigram_table()

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def hand_case() -> EditCase:
    return EditCase(case_id="h", relation="lives_in", subject="Alice", prompt="{} lives in",
                    target_true="Paris", target_new="New York City",
                    paraphrases=("Alice resides at", "Alice works on"),
                    neighborhood=(("Bob lives near", "Lyon France"), ("Carol lives by", "Lyon France"),
                                  ("Dan lives from", "Lyon France")))


def rome_prompt_nll(model, tok, prefix: str, target_new: str, target_true: str) -> dict[str, float]:
    """A direct transcription of rome's test_batch_prediction for one prefix: the prefix and each target are
    tokenized together, and each target's token NLLs are averaged over its length."""
    prefix_len = len(tok(prefix).input_ids)
    out = {}
    for key, target in (("target_new", target_new), ("target_true", target_true)):
        ids = tok(f"{prefix} {target}").input_ids
        target_tok = tok(f" {target}").input_ids
        logits = model(torch.tensor([ids])).logits[0]
        total = 0.0
        for j, token in enumerate(target_tok):
            total += -torch.log_softmax(logits[prefix_len + j - 1], dim=0)[token].item()
        out[key] = total / len(target_tok)
    return out


def rome_summary(rewrite, paraphrase, neighborhood) -> dict[str, float]:
    """rome's summarize.py for one case: *_success and *_diff from the per-prompt NLL dicts."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "efficacy_score": mean([x["target_true"] > x["target_new"] for x in rewrite]),
        "paraphrase_score": mean([x["target_true"] > x["target_new"] for x in paraphrase]),
        "neighborhood_score": mean([x["target_true"] < x["target_new"] for x in neighborhood]),
        "efficacy_magnitude": mean([math.exp(-x["target_new"]) - math.exp(-x["target_true"]) for x in rewrite]),
        "paraphrase_magnitude": mean([math.exp(-x["target_new"]) - math.exp(-x["target_true"]) for x in paraphrase]),
        "neighborhood_magnitude": mean([math.exp(-x["target_true"]) - math.exp(-x["target_new"])
                                        for x in neighborhood]),
    }


def test_scores_match_a_transcription_of_rome_on_hand_made_logits():
    model, tok, case = BigramModel(), WordTokenizer(), hand_case()
    scores = counterfact_scores(case_target_nll(model, tok, case, torch.device("cpu")))
    rewrite = [rome_prompt_nll(model, tok, case.rewrite_prompt, case.target_new, case.target_true)]
    paraphrase = [rome_prompt_nll(model, tok, p, case.target_new, case.target_true) for p in case.paraphrases]
    neighborhood = [rome_prompt_nll(model, tok, p, case.target_new, a) for p, a in case.neighborhood]
    expected = rome_summary(rewrite, paraphrase, neighborhood)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key
    # the same numbers by hand: mean NLL of "New York City" after "in" is ln 2, of "Paris" ln(1/0.3)
    assert scores["rewrite_prompts_nll"][0]["target_new"] == pytest.approx(math.log(2), abs=1e-6)
    assert scores["rewrite_prompts_nll"][0]["target_true"] == pytest.approx(-math.log(0.3), abs=1e-6)
    assert (scores["efficacy_score"], scores["paraphrase_score"]) == (1.0, 0.5)
    assert scores["neighborhood_score"] == pytest.approx(2 / 3)
    assert scores["efficacy_magnitude"] == pytest.approx(0.5 - 0.3, abs=1e-6)
    # the summed log-probabilities rank these targets the other way round on three prompts
    assert scores["log_p_new"] == pytest.approx(3 * math.log(0.5), abs=1e-6)
    assert scores["log_p_new"] < scores["log_p_true"] == pytest.approx(math.log(0.3), abs=1e-6)
    assert len(scores["paraphrase_prompts_nll"]) == 2 and len(scores["neighborhood_prompts_nll"]) == 3


def recompute_from_cases(records: list[dict]) -> dict[str, float]:
    """ES/PS/NS (means over cases, a failed case counting 0) from the per-prompt NLLs in cases.jsonl."""
    per_case = []
    for record in records:
        if record["status"] != "ok":
            per_case.append({"efficacy_score": 0.0, "paraphrase_score": 0.0, "neighborhood_score": 0.0})
            continue
        post = record["post"]
        per_case.append(rome_summary(post["rewrite_prompts_nll"], post["paraphrase_prompts_nll"],
                                     post["neighborhood_prompts_nll"]))
    return {key: sum(c[key] for c in per_case) / len(per_case)
            for key in ("efficacy_score", "paraphrase_score", "neighborhood_score")}


@pytest.mark.skipif(not SHARED_COUNTERFACT.exists(), reason=f"no shared CounterFact file at {SHARED_COUNTERFACT}")
def test_es_ps_ns_recomputed_from_a_counterfact_run_folder(tmp_path, monkeypatch, device, one_thread):
    hp = tiny_rome_hparams(tmp_path, "products, companies and languages")
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KEBENCH_COUNTERFACT", str(SHARED_COUNTERFACT))
    out = tmp_path / "runs"
    assert main(["run", "--editor", "rome", "--model", "tiny-gpt2", "--dataset", "counterfact", "--n", "4",
                 "--no-circuits", "--ppl-texts", "0", "--output", str(out), "--hparams", str(hp),
                 "--device", device]) == 0
    (run_dir,) = out.iterdir()
    records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(records) == 4
    for key, value in recompute_from_cases(records).items():
        assert summary[key] == pytest.approx(value, abs=1e-12), key
        assert summary["metrics"][key]["protocol"] == "sequence log-likelihood comparison"
    assert all(len(r["pre"]["rewrite_prompts_nll"]) == 1 for r in records)
    # every valid record is eligible (no known-fact filter), and the counts are in the summary
    assert summary["case_selection"] == "every valid record" and summary["n_unknown_skipped"] == 0
    assert summary["n_loaded"] == 1919 + summary["n_rejected"] and summary["n_selected"] == 4
    assert (summary["n_cases"], summary["n_failed"]) == (4, 0)


def test_known_only_with_nothing_known_is_a_one_line_error(tmp_path, capsys, one_thread):
    """A random tiny model knows none of the built-in facts: the filter leaves nothing to edit."""
    code = main(["run", "--editor", "ft-l", "--model", "tiny-gpt2", "--known-only", "--no-circuits", "--ppl-texts", "0",
                 "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "error: no case to edit: none of the" in err and "is known to the model" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def ok_record(es: float, ps: float, ns: float) -> dict:
    """A finished case whose per-prompt NLLs give the wanted 0/1 outcomes."""
    win, lose = {"target_new": 0.5, "target_true": 2.0}, {"target_new": 2.0, "target_true": 0.5}
    post = {"rewrite_prompts_nll": [win if es else lose], "paraphrase_prompts_nll": [win if ps else lose],
            "neighborhood_prompts_nll": [lose if ns else win]}
    return {"status": "ok", "post": post, "post_generation": {"generation_success": 1.0}}


def test_a_failed_case_counts_as_a_failure():
    ok = [ok_record(1, 1, 1), ok_record(1, 0, 1)]
    failed = {"case_id": "x", "status": "failed", "reason": "RuntimeError: boom", "phase": "edit"}
    clean, with_failure = summarize(ok), summarize(ok + [failed])
    assert clean["efficacy_score"] == 1.0 and with_failure["efficacy_score"] == pytest.approx(2 / 3)
    m = with_failure["metrics"]
    assert m["efficacy_score"]["n"] == 3 and m["efficacy_score"]["n_failed_counted"] == 1
    assert m["paraphrase_score"]["mean"] == pytest.approx(1 / 3)
    assert m["neighborhood_score"]["mean"] == pytest.approx(2 / 3)
    assert m["generation_success"]["mean"] == pytest.approx(2 / 3)
    es, ps, ns = 2 / 3, 1 / 3, 2 / 3
    assert m["score"]["mean"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns)) and m["score"]["n"] == 3
    # metrics that are not success rates leave the failed case out
    assert m["efficacy_magnitude"]["n"] == 2 and "n_failed_counted" not in m["efficacy_magnitude"]
    # a run where every case failed reports ES 0 over its failures, not nothing
    assert summarize([failed, failed])["metrics"]["efficacy_score"]["mean"] == 0.0


def test_every_metric_carries_a_protocol_label():
    summary = summarize([ok_record(1, 1, 0) | {"drift_kl": 0.1, "circuit_extra": 0.2, "seconds_edit": 1.0}])
    assert summary["metrics"]
    for name, agg in summary["metrics"].items():
        assert {"protocol", "scorer", "comparable_group", "reference"} <= set(agg), name
    assert summary["metrics"]["efficacy_score"]["comparable_group"] == "counterfact.mean_token_nll.success"


def test_records_without_per_prompt_nlls_give_no_counterfact_scores():
    """Older runs compared summed log-probabilities: a different protocol, so no ES rather than a wrong one."""
    old = {"status": "ok", "post": {"efficacy_score": 1.0, "paraphrase_score": 1.0, "neighborhood_score": 1.0}}
    assert "efficacy_score" not in summarize([old])["metrics"]


def test_target_position_logprobs_equal_the_full_forwards(tiny_model, one_thread):
    """Scoring sends only the target positions through the unembedding; the log-probs are those of the full
    logits (HF's forward, every position) at the same places."""
    from bench.data import load_dataset
    from bench.scoring import case_prompts, paired_prompts, target_token_logprobs
    from lmview.tokens import build_batch, target_token_logprobs_from_logits

    case = load_dataset("facts").cases[0]
    prompts, targets = paired_prompts(case_prompts(case), case.target_new)
    assert prompts[:2] == [case.rewrite_prompt] * 2 and targets[:2] == [case.target_new, case.target_true]
    batch = build_batch(tiny_model.tokenizer, prompts, targets, tiny_model.device)
    with torch.no_grad():
        full = tiny_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected = target_token_logprobs_from_logits(full.float(), batch)
        got = target_token_logprobs(tiny_model.model, batch)
    assert got.shape == expected.shape and bool(batch.target_mask.any())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
