"""Clean/corrupted prompt pairs for circuit discovery: the subject swapped for another of equal token length."""

from __future__ import annotations

import random

from bench.data import EditCase
from bench.tokens import prompt_ids, target_ids
from circuits.activations import PairBatch


def corrupted_prompt(tokenizer, prompt: str, subject: str, pool: list[str], rng: random.Random) -> list[int] | None:
    """The prompt with another subject from the pool whose prompt has the same token length.

    The last occurrence of the subject is swapped: with in-context demonstrations before the query
    (ike), that is the query's subject; a prompt holding the subject once is unaffected.
    """
    ids = prompt_ids(tokenizer, prompt)
    head, _, tail = prompt.rpartition(subject)
    candidates = [s for s in pool if s != subject and s not in prompt]
    rng.shuffle(candidates)
    for other in candidates:
        swapped = prompt_ids(tokenizer, head + other + tail)
        if len(swapped) == len(ids):
            return swapped
    return None


def circuit_batch(tokenizer, case: EditCase, answer: str, pool: list[str], device, seed: int = 0) -> PairBatch | None:
    """Rewrite prompt and paraphrases, each paired with a corrupted version; None if none can be corrupted."""
    rng = random.Random(f"{seed}:{case.case_id}")
    answer_id = target_ids(tokenizer, answer)[0]
    rows = []
    for prompt in (case.rewrite_prompt, *case.paraphrases):
        if case.subject not in prompt:
            continue
        corrupt = corrupted_prompt(tokenizer, prompt, case.subject, pool, rng)
        if corrupt is not None:
            rows.append((prompt_ids(tokenizer, prompt), corrupt, answer_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PairBatch.from_rows(rows, pad, device) if rows else None
