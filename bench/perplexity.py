"""Perplexity of held-out Wikipedia text: the side-effect drift of an edit on general text.

    ppl = exp( Σ_texts Σ_{t≥1} −log p(x_t | x_<t) / Σ_texts (len − 1) )

Token-weighted (every predicted token counts once, long texts weigh more than short ones), padding
masked, each text cut to `max_len` tokens. The held-out texts are the *last* texts of the same offline
Wikipedia corpus (sorted by title) whose key-statistics sample is drawn from all but its last
HELDOUT_TAIL (1,000) texts (editors/keystats.py), so the two sets are disjoint for n ≤ 1,000. The lifelong-editing papers (Gupta et al. 2024; Fang et al. 2025) report the same kind of
general-text perplexity; they use other corpora and lengths, so the numbers are comparable only within
this harness.
"""

from __future__ import annotations

import math

import torch

from editors.keystats import HELDOUT_TAIL
from lmview.corpus import DEFAULT_CORPUS, wiki_texts
from lmview.tokens import prompt_ids, right_padded

DEFAULT_HELDOUT = 32


def heldout_texts(n: int = DEFAULT_HELDOUT) -> list[str]:
    """The last n texts of the offline Wikipedia corpus: fixed, and disjoint from the key-statistics texts."""
    if n < 1:
        raise ValueError(f"held-out text count must be at least 1; got {n}")
    texts, _ = wiki_texts()
    if n > len(texts):
        raise ValueError(f"asked for {n} held-out texts; the corpus has {len(texts)}")
    return texts[-n:]


def overlaps_keystats(n_heldout: int, mom2_n_samples: int, corpus_size: int) -> bool:
    """Whether the last n_heldout texts can meet the key-statistics sample, which is drawn at random from all
    but the corpus's last HELDOUT_TAIL texts (editors/keystats.py)."""
    tail = min(HELDOUT_TAIL[DEFAULT_CORPUS], corpus_size - 1)
    return mom2_n_samples > 0 and n_heldout > tail


@torch.no_grad()
def token_nll_sum(model: torch.nn.Module, tokenizer, device: torch.device | str, texts: list[str],
                  max_len: int = 128, batch_size: int = 8) -> tuple[float, int]:
    """(Σ −log p(x_t | x_<t) over all predicted tokens, their count), right padding masked out."""
    rows = [r for r in (prompt_ids(tokenizer, t)[:max_len] for t in texts) if len(r) >= 2]
    rows.sort(key=len)  # similar lengths per batch: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(rows), batch_size):
        ids, mask = right_padded(rows[start: start + batch_size], pad, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        predicted = mask[:, 1:].bool()  # right padding: target t is real iff position t is
        total -= logp[predicted].double().sum()
        count += int(predicted.sum())
    return float(total), count


def wiki_perplexity(model: torch.nn.Module, tokenizer, device: torch.device | str, texts: list[str],
                    max_len: int = 128, batch_size: int = 8) -> float:
    """Token-weighted perplexity of `texts` (each cut to max_len tokens)."""
    nll, count = token_nll_sum(model, tokenizer, device, texts, max_len, batch_size)
    if count == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    try:
        return math.exp(nll / count)
    except OverflowError:  # a collapsed model: a mean NLL over ~709 nats
        return math.inf
