"""Clean/corrupted prompt pairs for circuit discovery: the subject swapped for another of equal token length.

A corrupting subject never shares the case's answers: not its true answer, nor its new target (so that
neither the pre-edit circuit for target_true nor the post-edit one for target_new compares the answer with
itself). Two guards, both applied to every candidate:
- by the data: a subject whose own dataset answer (any relation) is one of the case's answers is skipped;
- by the model, when one is given: the corrupted prompt's greedy next token must be neither answer's first
  token (checked on the weights in use, so after an edit also against target_new on the edited weights).

A case's prompts (the rewrite prompt, then its paraphrases) are split into two disjoint sets, `prompt_sets`:
set A builds the circuit, set B builds the noise-floor circuit and measures out-of-sample faithfulness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch

from circuits.activations import PairBatch
from lmview.case import EditCase
from lmview.tokens import prompt_ids, target_ids


def _norm(answer: str) -> str:
    return answer.strip().lower()


@dataclass
class CorruptionPool:
    """Subjects that may be swapped in, and the answers the dataset gives each of them."""

    subjects: list[str]
    answers: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_cases(cls, cases: Iterable[EditCase]) -> CorruptionPool:
        answers: dict[str, set[str]] = {}
        for case in cases:
            answers.setdefault(case.subject, set()).add(_norm(case.target_true))
        return cls(sorted(answers), {s: frozenset(a) for s, a in answers.items()})

    @classmethod
    def of(cls, pool: CorruptionPool | Sequence[str]) -> CorruptionPool:
        return pool if isinstance(pool, CorruptionPool) else cls(sorted(set(pool)))

    def candidates(self, prompt: str, subject: str, forbidden: Iterable[str]) -> list[str]:
        banned = {_norm(a) for a in forbidden}
        return [s for s in self.subjects
                if s != subject and s not in prompt and not (self.answers.get(s, frozenset()) & banned)]


def corrupted_prompt(tokenizer, prompt: str, subject: str, pool: CorruptionPool | Sequence[str], rng: random.Random,
                     forbidden: Sequence[str] = (), accept: Callable[[list[int]], bool] | None = None,
                     prefer: Sequence[str] = (), avoid: Iterable[str] = ()) -> list[int] | None:
    """The prompt with another subject from the pool whose prompt has the same token length.

    The last occurrence of the subject is swapped: with in-context demonstrations before the query
    (ike), that is the query's subject; a prompt holding the subject once is unaffected. Candidates whose
    dataset answer is in `forbidden`, or in `avoid`, are skipped; `accept` (e.g. the model check) must pass;
    subjects in `prefer` are tried first, in order.
    """
    return _corrupt(tokenizer, prompt, subject, pool, rng, forbidden, accept, prefer, avoid)[0]


def _corrupt(tokenizer, prompt: str, subject: str, pool: CorruptionPool | Sequence[str], rng: random.Random,
             forbidden: Sequence[str], accept: Callable[[list[int]], bool] | None, prefer: Sequence[str],
             avoid: Iterable[str]) -> tuple[list[int] | None, str | None]:
    ids = prompt_ids(tokenizer, prompt)
    head, _, tail = prompt.rpartition(subject)
    avoided = set(avoid)
    candidates = [s for s in CorruptionPool.of(pool).candidates(prompt, subject, forbidden) if s not in avoided]
    rng.shuffle(candidates)
    first = [s for s in prefer if s in candidates]
    for other in first + [s for s in candidates if s not in first]:
        swapped = prompt_ids(tokenizer, head + other + tail)
        if len(swapped) == len(ids) and (accept is None or accept(swapped)):
            return swapped, other
    return None, None


def prompt_sets(case: EditCase) -> tuple[list[str], list[str]]:
    """Set A (rewrite prompt, 2nd paraphrase, ...) and the disjoint set B (1st, 3rd paraphrase, ...),
    of the prompts that contain the subject."""
    prompts = [p for p in (case.rewrite_prompt, *case.paraphrases) if case.subject in p]
    return prompts[0::2], prompts[1::2]


def answer_check(model: torch.nn.Module, tokenizer, answers: Sequence[str], device) -> Callable[[list[int]], bool]:
    """True when the model's greedy next token after the ids is none of the answers' first tokens."""
    banned = {target_ids(tokenizer, a)[0] for a in answers}

    @torch.no_grad()
    def accept(ids: list[int]) -> bool:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
        return int(logits.argmax()) not in banned

    return accept


@dataclass
class PromptPairs:
    """Clean and corrupted token ids per prompt, and the subject swapped in (None: no partner found)."""

    clean: list[list[int]]
    corrupt: list[list[int] | None]
    swapped: list[str | None]

    @property
    def used(self) -> set[str]:
        return {s for s in self.swapped if s is not None}

    def batch(self, tokenizer, answer: str, device) -> PairBatch | None:
        """The pairs that have a partner, all read for `answer`; None when none has."""
        answer_id = target_ids(tokenizer, answer)[0]
        rows = [(c, x, answer_id) for c, x in zip(self.clean, self.corrupt) if x is not None]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return PairBatch.from_rows(rows, pad, device) if rows else None


def prompt_pairs(tokenizer, case: EditCase, prompts: Sequence[str], pool: CorruptionPool | Sequence[str],
                 seed: int = 0, tag: str = "", accept: Callable[[list[int]], bool] | None = None,
                 prefer: Sequence[str | None] = (), avoid: Iterable[str] = ()) -> PromptPairs:
    """A corrupted partner for each prompt, never sharing target_true or target_new (see the module doc)."""
    rng = random.Random(f"{seed}:{case.case_id}{tag}")
    avoided = set(avoid)
    clean, corrupt, swapped = [], [], []
    for i, prompt in enumerate(prompts):
        first = [prefer[i]] if i < len(prefer) and prefer[i] else []
        ids, other = _corrupt(tokenizer, prompt, case.subject, pool, rng, (case.target_true, case.target_new),
                              accept, first, avoided)
        clean.append(prompt_ids(tokenizer, prompt))
        corrupt.append(ids)
        swapped.append(other)
    return PromptPairs(clean, corrupt, swapped)


def circuit_batch(tokenizer, case: EditCase, answer: str, pool: CorruptionPool | Sequence[str], device,
                  seed: int = 0, accept: Callable[[list[int]], bool] | None = None) -> PairBatch | None:
    """Rewrite prompt and paraphrases, each paired with a corrupted version; None if none can be corrupted."""
    prompts = [p for p in (case.rewrite_prompt, *case.paraphrases) if case.subject in p]
    return prompt_pairs(tokenizer, case, prompts, pool, seed, accept=accept).batch(tokenizer, answer, device)


def with_answer(batch: PairBatch, answer_id: int) -> PairBatch:
    """The same pairs read for another answer token."""
    return replace(batch, answer_ids=torch.full_like(batch.answer_ids, answer_id))
