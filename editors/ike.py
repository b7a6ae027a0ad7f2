"""IKE: in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

No weight changes. The new fact f = "<rewrite prompt> <target_new>" is put in the context C, and a query
x is answered from [C; x] (paper §3, eq. 1: o' = argmax P(o | C, x)). C is a list of demonstrations, each
in the paper's format "New Fact: <fact>\\nPrompt: <prompt> <answer>\\n\\n", of three kinds (paper §3.2):

- copy:   the prompt is the fact's own prompt, the answer the new target;
- update: the prompt is a paraphrase of the fact's prompt, the answer the new target;
- retain: the prompt is an unrelated (neighbourhood) prompt, the answer its unchanged true answer.

The query follows the demonstrations as "New Fact: <fact>\\nPrompt: <query>" (EasyEdit's evaluation
format), and the harness scores the prefixed prompts (`evaluation_case`).

What differs from the paper, deliberately:
- The paper retrieves k = 32 demonstrations of *other* facts from a training split by sentence-
  embedding similarity. Here every demonstration is built from the edited case itself: one copy
  demonstration, up to `n_update` update demonstrations from the case's paraphrases and up to
  `n_retain` retain demonstrations from its neighbourhood prompts, all under the case's own new fact.
- The paraphrases and neighbourhood prompts are also what the harness scores (PS, NS). To keep a
  prompt from seeing its own answer, every scored prompt gets its own prefix that leaves that prompt
  out (leave-one-out): paraphrase i is scored after update demonstrations from the other paraphrases
  only, neighbourhood prompt k after retain demonstrations from the other neighbourhood prompts only.
  The rewrite prompt sees the copy demonstration, as in the paper.
- Demonstrations are ordered copy, then update and retain alternating (the paper orders them by
  similarity). When a prefixed prompt and its answer would not fit the model's context window, the
  last demonstrations are dropped until it fits (the copy demonstration is kept).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bench.tokens import prompt_ids, target_ids
from editors.base import EditOutcome, Editor, EditorError, register

if TYPE_CHECKING:
    from bench.data import EditCase
    from bench.models import ModelBundle


def demonstration(fact: str, prompt: str, answer: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt} {answer}\n\n"


def query_text(fact: str, prompt: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt}"


def _interleave(first: list[str], second: list[str]) -> list[str]:
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out += first[i: i + 1] + second[i: i + 1]
    return out


def demonstrations(case: EditCase, n_update: int, n_retain: int, skip_paraphrase: int | None = None,
                   skip_neighbour: int | None = None) -> list[str]:
    """Copy, update and retain demonstrations for one case, leaving out the prompt being scored."""
    fact = f"{case.rewrite_prompt} {case.target_new}"
    copy = [demonstration(fact, case.rewrite_prompt, case.target_new)]
    update = [demonstration(fact, p, case.target_new) for i, p in enumerate(case.paraphrases)
              if i != skip_paraphrase][:n_update]
    retain = [demonstration(fact, p, a) for k, (p, a) in enumerate(case.neighborhood)
              if k != skip_neighbour][:n_retain]
    return copy + _interleave(update, retain)


@register("ike")
class InContextEditor(Editor):
    """IKE (Zheng et al. 2023): copy/update/retain demonstrations before every prompt; no weight change."""

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.n_update = int(hparams.get("n_update", 3))
        self.n_retain = int(hparams.get("n_retain", 4))
        if self.n_update < 0 or self.n_retain < 0:
            raise EditorError("ike: n_update and n_retain must be >= 0")

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return []

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        tok = self.bundle.tokenizer
        lengths = [len(prompt_ids(tok, self.evaluation_case(case).rewrite_prompt)) for case in cases]
        return EditOutcome(layers=[], stats={"n_cases": len(cases),
                                             "rewrite_prompt_tokens": sum(lengths) / max(len(cases), 1)})

    def context_limit(self) -> int | None:
        config = self.bundle.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    def prefix(self, case: EditCase, skip_paraphrase: int | None = None, skip_neighbour: int | None = None,
               query: str = "", answers: tuple[str, ...] = ()) -> str:
        """The demonstrations, fewer if query + longest answer would overflow the context window."""
        demos = demonstrations(case, self.n_update, self.n_retain, skip_paraphrase, skip_neighbour)
        limit, tok = self.context_limit(), self.bundle.tokenizer
        if limit is None:
            return "".join(demos)
        answer_len = max((len(target_ids(tok, a)) for a in answers), default=0)
        while len(demos) > 1 and len(prompt_ids(tok, "".join(demos) + query)) + answer_len > limit:
            demos.pop()
        return "".join(demos)

    def _prefixed(self, case: EditCase, query: str, answers: tuple[str, ...], **skip: int) -> str:
        return self.prefix(case, query=query, answers=answers, **skip) + query

    def evaluation_case(self, case: EditCase) -> EditCase:
        """Every scored prompt behind its own (leave-one-out) demonstrations and the new-fact line."""
        fact = f"{case.rewrite_prompt} {case.target_new}"
        both = (case.target_new, case.target_true)
        template = self._prefixed(case, query_text(fact, case.rewrite_prompt), both)
        template = template[: -len(case.rewrite_prompt)].replace("{}", "{ }") + case.prompt
        paraphrases = tuple(self._prefixed(case, query_text(fact, p), both, skip_paraphrase=i)
                            for i, p in enumerate(case.paraphrases))
        neighborhood = tuple((self._prefixed(case, query_text(fact, p), (case.target_new, a), skip_neighbour=k), a)
                             for k, (p, a) in enumerate(case.neighborhood))
        return replace(case, prompt=template, paraphrases=paraphrases, neighborhood=neighborhood)
