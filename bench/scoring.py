"""CounterFact scores as ROME's evaluation computes them (Meng et al. 2022), and side-effect drift.

For each prompt, ROME scores the two targets by their *mean per-token* negative log-likelihood (NLL):
for a target of tokens y_1..y_m after prompt x, NLL = -(1/m) Σ_j log p(y_j | x, y_<j)
(rome `experiments/py/eval_utils_counterfact.py`, `test_batch_prediction`). From those per-prompt values
(rome's `*_prompts_probs`, here `*_prompts_nll`), `experiments/summarize.py` derives per case:

* ES, PS: the fraction of rewrite / paraphrase prompts where NLL(target_true) > NLL(target_new);
* NS: the fraction of neighbourhood prompts where NLL(target_true) < NLL(target_new);
* EM, PM: the mean of exp(-NLL(new)) - exp(-NLL(true)); NM: the mean of exp(-NLL(true)) - exp(-NLL(new)).

exp(-NLL) is the geometric mean of the target's token probabilities, so targets of different token
counts are compared per token. A neighbourhood prompt's "true" target is its own answer (CounterFact:
the case's target_true) and its "new" target is the case's target_new.

Besides, `log_p_new`/`log_p_true` (and `p_new`/`p_true`) are the *sequence* log-probabilities of the
targets on the rewrite prompt, summed over tokens; they feed the harness's `log_p_new_lift` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmview.case import EditCase
from lmview.tokens import TargetBatch, build_batch, next_token_logprobs, target_token_logprobs_from_logits

PROMPT_GROUPS = ("rewrite", "paraphrase", "neighborhood")


@dataclass
class CaseTargetNLL:
    """Mean per-token NLL of (target_new, target_true) after each prompt of each group, and the summed
    sequence log-probabilities of the two targets on the rewrite prompt."""

    pairs: dict[str, list[tuple[float, float]]]  # group -> [(nll_new, nll_true) per prompt]
    rewrite_logprob_new: float
    rewrite_logprob_true: float


def case_prompts(case: EditCase) -> dict[str, list[tuple[str, str]]]:
    """group -> [(prompt, true answer)]; every prompt is also scored with case.target_new."""
    return {"rewrite": [(case.rewrite_prompt, case.target_true)],
            "paraphrase": [(p, case.target_true) for p in case.paraphrases],
            "neighborhood": list(case.neighborhood)}


def paired_prompts(groups: dict[str, list[tuple[str, str]]], target_new: str) -> tuple[list[str], list[str]]:
    """Every prompt of case_prompts' groups twice, in order: with target_new, then with its true answer."""
    prompts, targets = [], []
    for rows in groups.values():
        for prompt, true_answer in rows:
            prompts += [prompt, prompt]
            targets += [target_new, true_answer]
    return prompts, targets


def target_token_logprobs(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """log p(target token j | prompt, target tokens < j): [B, J], 0 at padded positions. Only the target
    positions go through the unembedding (the full logits would cost d_model x vocab at every position);
    each row's logits are the same numbers the full forward gives there."""
    base, head = getattr(model, "base_model", model), getattr(model, "get_output_embeddings", lambda: None)()
    if base is model or head is None:  # not a Hugging Face causal LM with a separate head: the full logits
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return target_token_logprobs_from_logits(logits.float(), batch)
    hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden.gather(1, batch.logit_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    token_lp = head(picked).float().log_softmax(-1).gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    return token_lp * batch.target_mask


@torch.no_grad()
def case_target_nll(model: torch.nn.Module, tokenizer, case: EditCase, device: torch.device) -> CaseTargetNLL:
    """Every prompt with both targets, in a single batched forward pass."""
    groups = case_prompts(case)
    batch = build_batch(tokenizer, *paired_prompts(groups, case.target_new), device)
    token_lp = target_token_logprobs(model, batch).double()
    sums = token_lp.sum(-1)
    nll = (-sums / batch.target_mask.sum(-1)).tolist()
    pairs, row = {}, 0
    for name, rows in groups.items():
        pairs[name] = [(nll[row + 2 * i], nll[row + 2 * i + 1]) for i in range(len(rows))]
        row += 2 * len(rows)
    return CaseTargetNLL(pairs, float(sums[0]), float(sums[1]))


def success_rate(pairs: list[tuple[float, float]], new_should_win: bool) -> float | None:
    """Fraction of prompts where the wanted target has the strictly lower mean NLL (None: no prompts)."""
    if not pairs:
        return None
    wins = [(true > new) if new_should_win else (true < new) for new, true in pairs]
    return sum(wins) / len(wins)


def probability_gap(pairs: list[tuple[float, float]], new_should_win: bool) -> float | None:
    """Mean of exp(-NLL(wanted)) - exp(-NLL(other)) over the prompts (None: no prompts)."""
    if not pairs:
        return None
    sign = 1.0 if new_should_win else -1.0
    gaps = [sign * (math.exp(-new) - math.exp(-true)) for new, true in pairs]
    return sum(gaps) / len(gaps)


SCORE_KEYS = {  # score key -> (prompt group, whether target_new should win)
    "efficacy_score": ("rewrite", True), "paraphrase_score": ("paraphrase", True),
    "neighborhood_score": ("neighborhood", False),
}
MAGNITUDE_KEYS = {"efficacy_magnitude": ("rewrite", True), "paraphrase_magnitude": ("paraphrase", True),
                  "neighborhood_magnitude": ("neighborhood", False)}


def nll_field(group: str) -> str:
    """The per-case record key holding a group's per-prompt NLLs (ROME's `<group>_prompts_probs`)."""
    return f"{group}_prompts_nll"


def scores_from_pairs(pairs: dict[str, list[tuple[float, float]]]) -> dict[str, float | None]:
    """ES, PS, NS and EM, PM, NM of one case from its per-prompt (nll_new, nll_true) pairs."""
    out: dict[str, float | None] = {}
    for key, (group, new_wins) in SCORE_KEYS.items():
        out[key] = success_rate(pairs.get(group, []), new_wins)
    for key, (group, new_wins) in MAGNITUDE_KEYS.items():
        out[key] = probability_gap(pairs.get(group, []), new_wins)
    return out


def counterfact_scores(nll: CaseTargetNLL) -> dict[str, object]:
    """The case's scores, its per-prompt NLLs (recomputable record) and the rewrite sequence log-probs."""
    out: dict[str, object] = dict(scores_from_pairs(nll.pairs))
    for group, pairs in nll.pairs.items():
        out[nll_field(group)] = [{"target_new": new, "target_true": true} for new, true in pairs]
    out["log_p_new"] = nll.rewrite_logprob_new
    out["log_p_true"] = nll.rewrite_logprob_true
    out["p_new"] = math.exp(nll.rewrite_logprob_new)
    out["p_true"] = math.exp(nll.rewrite_logprob_true)
    return out


def pairs_from_record(scores: dict[str, object]) -> dict[str, list[tuple[float, float]]] | None:
    """The per-prompt (nll_new, nll_true) pairs stored in a record's "pre"/"post" scores, or None when
    the record predates them."""
    if not isinstance(scores, dict) or not all(isinstance(scores.get(nll_field(g)), list) for g in PROMPT_GROUPS):
        return None
    pairs = {}
    for group in PROMPT_GROUPS:
        rows = scores[nll_field(group)]
        try:
            pairs[group] = [(float(r["target_new"]), float(r["target_true"])) for r in rows]
        except (KeyError, TypeError, ValueError):
            return None
    return pairs


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def neighborhood_next_token(model: torch.nn.Module, tokenizer, case: EditCase, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return next_token_logprobs(model, tokenizer, [p for p, _ in case.neighborhood], device)


def drift_kl(pre: torch.Tensor, post: torch.Tensor) -> float:
    """Mean KL(pre || post) between next-token distributions (log-probs [B, V])."""
    return float((pre.exp() * (pre - post)).sum(-1).mean())


@torch.no_grad()
def top1_matches(model: torch.nn.Module, tokenizer, prompts: list[str], answers: list[str],
                 device: torch.device, batch_size: int = 32) -> list[bool]:
    """Whether the model's greedy next token after each prompt is the answer's first token."""
    from lmview.tokens import target_ids

    hits: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        lp = next_token_logprobs(model, tokenizer, prompts[start: start + batch_size], device)
        first = torch.tensor([target_ids(tokenizer, a)[0] for a in answers[start: start + batch_size]], device=device)
        hits.append(lp.argmax(-1) == first)
    return torch.cat(hits).tolist() if hits else []
