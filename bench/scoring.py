"""CounterFact-style edit scores (Meng et al. 2022) and side-effect drift.

Probabilities cover the whole multi-token target: log P(target) is the sum of
its tokens' log-probabilities given the prompt and the preceding target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.data import EditCase
from bench.tokens import build_batch, next_token_logprobs, target_logprob_from_logits


@dataclass
class CaseLogprobs:
    """log P(target_new) and log P(target_true) on each prompt group."""

    rewrite_new: torch.Tensor  # [1]
    rewrite_true: torch.Tensor
    paraphrase_new: torch.Tensor  # [n_paraphrases]
    paraphrase_true: torch.Tensor
    neighborhood_new: torch.Tensor  # [n_neighborhood]
    neighborhood_true: torch.Tensor


@torch.no_grad()
def case_logprobs(model: torch.nn.Module, tokenizer, case: EditCase, device: torch.device) -> CaseLogprobs:
    """All target log-probabilities of one case in a single batched forward pass."""
    groups = [[case.rewrite_prompt], list(case.paraphrases), [p for p, _ in case.neighborhood]]
    trues = [[case.target_true], [case.target_true] * len(case.paraphrases), [a for _, a in case.neighborhood]]
    prompts, targets = [], []
    for group, true_answers in zip(groups, trues):
        prompts += group + group
        targets += [case.target_new] * len(group) + true_answers
    batch = build_batch(tokenizer, prompts, targets, device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    values = target_logprob_from_logits(logits.float(), batch)
    parts, start = [], 0
    for group in groups:
        n = len(group)
        parts += [values[start: start + n], values[start + n: start + 2 * n]]
        start += 2 * n
    return CaseLogprobs(*parts)


def counterfact_scores(lp: CaseLogprobs) -> dict[str, float]:
    """ES, PS, NS (success rates), their harmonic mean and the probability-gap magnitudes."""
    es = (lp.rewrite_new > lp.rewrite_true).float().mean()
    ps = (lp.paraphrase_new > lp.paraphrase_true).float().mean()
    ns = (lp.neighborhood_true > lp.neighborhood_new).float().mean()
    em = (lp.rewrite_new.exp() - lp.rewrite_true.exp()).mean()
    pm = (lp.paraphrase_new.exp() - lp.paraphrase_true.exp()).mean()
    nm = (lp.neighborhood_true.exp() - lp.neighborhood_new.exp()).mean()
    values = torch.stack([es, ps, ns, em, pm, nm]).tolist()
    keys = ["efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude",
            "paraphrase_magnitude", "neighborhood_magnitude"]
    out = dict(zip(keys, values))
    out["p_new"] = float(lp.rewrite_new.exp())
    out["p_true"] = float(lp.rewrite_true.exp())
    return out


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
    from bench.tokens import target_ids

    hits: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        lp = next_token_logprobs(model, tokenizer, prompts[start: start + batch_size], device)
        first = torch.tensor([target_ids(tokenizer, a)[0] for a in answers[start: start + batch_size]], device=device)
        hits.append(lp.argmax(-1) == first)
    return torch.cat(hits).tolist() if hits else []
