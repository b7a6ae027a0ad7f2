"""IKE: in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

No weight changes. The new fact f = "<rewrite prompt> <target_new>" is put in the context, and every scored
prompt x is answered from [C; "New Fact: f\\nPrompt: x"] (paper §3, eq. 1; EasyEdit's evaluation format).
C holds k demonstrations of *other* facts, of the paper's three kinds (§3.2), each in the format
"New Fact: <fact>\\nPrompt: <prompt> <answer>\\n\\n":

- copy:   the other fact's own prompt, answered with its new target;
- update: a paraphrase of the other fact's prompt, answered with its new target;
- retain: one of the other fact's neighbourhood prompts, answered with its unchanged true answer.

As EasyEdit builds them (`easyeditor/models/ike/util.py`): one demonstration of each kind per pool record
(its first paraphrase, its first neighbour), and the k most similar to the query
"New Fact: f\\nPrompt: <rewrite prompt>\\n\\n" are prepended, most similar first
(`models/ike/ike_main.py`; its gpt2-xl file sets k = 16, the paper k = 32).

The pool is the run's dataset (`Editor.observe_dataset`): every other record, leaving out the edited case,
every record with the same subject, and every demonstration whose text contains one of the case's scored
prompts (rewrite, paraphrases, neighbourhood, locality, portability), so no scored prompt is ever shown
with an answer.

Variant, named: retrieval is lexical ("tfidf"): cosine similarity of TF-IDF vectors of lower-cased word
tokens, idf = ln((1 + N) / (1 + df)) + 1 over the pool's demonstrations; ties keep pool order. IKE and
EasyEdit embed with a sentence encoder (EasyEdit: all-MiniLM-L6-v2), which is not available offline here.

When the demonstrations, a query and what follows it (its longest answer, or the GENERATED_TOKENS tokens that
the generation metrics decode) would not fit the model's context window, the least similar demonstrations
are dropped until the longest query of the case fits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from editors.base import EditOutcome, Editor
from editors.settings import Hparams, setting
from lmview.tokens import prompt_ids, target_ids

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

GENERATED_TOKENS = 20  # the tokens bench/metrics.py decodes after a prompt (GENERATION_MAX_NEW_TOKENS)
RETRIEVALS = ("tfidf",)


def demonstration(fact: str, prompt: str, answer: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt} {answer}\n\n"


def query_text(fact: str, prompt: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt}"


def new_fact(case: EditCase) -> str:
    return f"{case.rewrite_prompt} {case.target_new}"


def pool_demonstrations(case: EditCase) -> list[str]:
    """The copy, update and retain demonstrations one pool record contributes (EasyEdit's encode_ike_facts)."""
    fact = new_fact(case)
    demos = [demonstration(fact, case.rewrite_prompt, case.target_new)]
    if case.paraphrases:
        demos.append(demonstration(fact, case.paraphrases[0], case.target_new))
    if case.neighborhood:
        demos.append(demonstration(fact, *case.neighborhood[0]))
    return demos


def scored_prompts(case: EditCase) -> list[str]:
    """Every prompt the harness scores for this case."""
    pairs = (*case.neighborhood, *case.locality, *case.portability)
    return [case.rewrite_prompt, *case.paraphrases, *(p for p, _ in pairs)]


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@dataclass
class Pool:
    """Demonstrations of the dataset's records, with their TF-IDF vectors."""

    owners: list[EditCase]  # the record each demonstration comes from
    texts: list[str]
    idf: dict[str, float]
    vectors: list[dict[str, float]]

    @classmethod
    def build(cls, cases: list[EditCase]) -> Pool:
        owners, texts = [], []
        for case in cases:
            for text in pool_demonstrations(case):
                owners.append(case)
                texts.append(text)
        df = Counter(word for text in texts for word in set(words(text)))
        idf = {word: math.log((1 + len(texts)) / (1 + n)) + 1 for word, n in df.items()}
        pool = cls(owners, texts, idf, [])
        pool.vectors = [pool.vector(text) for text in texts]
        return pool

    def vector(self, text: str) -> dict[str, float]:
        """L2-normalised TF-IDF; words outside the pool get the largest idf."""
        unseen = math.log(1 + len(self.texts)) + 1
        raw = {word: count * self.idf.get(word, unseen) for word, count in Counter(words(text)).items()}
        norm = math.sqrt(sum(v * v for v in raw.values())) or 1.0
        return {word: v / norm for word, v in raw.items()}

    def nearest(self, case: EditCase, k: int) -> list[str]:
        """The k demonstrations most similar to the case's query, most similar first, leak-free."""
        query = self.vector(query_text(new_fact(case), case.rewrite_prompt) + "\n\n")
        hidden = scored_prompts(case)
        scored = []
        for index, (owner, text) in enumerate(zip(self.owners, self.texts)):
            if owner.case_id == case.case_id or owner.subject == case.subject:
                continue
            if any(prompt in text for prompt in hidden):
                continue
            similarity = sum(v * self.vectors[index].get(word, 0.0) for word, v in query.items())
            scored.append((-similarity, index))
        return [self.texts[index] for _, index in sorted(scored)[:k]]


@dataclass(frozen=True)
class IkeHparams(Hparams):
    editor = "ike"
    k: int = setting(16, minimum=0, unit="demonstrations", doc="retrieved demonstrations before every prompt")
    retrieval: str = setting("tfidf", choices=RETRIEVALS, doc="how demonstrations are ranked")


class InContextEditor(Editor, hparams=IkeHparams):
    """IKE (Zheng et al. 2023): k retrieved demonstrations of other facts before every prompt; no weight change."""

    hp: IkeHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.k = self.hp.k
        self.retrieval = self.hp.retrieval
        self.pool = Pool.build([])

    def observe_dataset(self, cases: list[EditCase]) -> None:
        self.pool = Pool.build(cases)

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return []

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        tok = self.bundle.tokenizer
        shown = [len(self.demonstrations(case)) for case in cases]
        lengths = [len(prompt_ids(tok, self.evaluation_case(case).rewrite_prompt)) for case in cases]
        return EditOutcome(layers=[], stats={"n_cases": len(cases), "demonstrations": sum(shown) / max(len(cases), 1),
                                             "rewrite_prompt_tokens": sum(lengths) / max(len(cases), 1)})

    def context_limit(self) -> int | None:
        config = self.bundle.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    def demonstrations(self, case: EditCase) -> list[str]:
        """The retrieved demonstrations, the least similar dropped until every query of the case fits."""
        demos = self.pool.nearest(case, self.k)
        limit, tok = self.context_limit(), self.bundle.tokenizer
        if limit is None:
            return demos
        fact = new_fact(case)
        answers = [case.target_new, case.target_true, *(a for _, a in case.neighborhood)]
        room = max(GENERATED_TOKENS, *(len(target_ids(tok, a)) for a in answers))
        longest = max((query_text(fact, p) for p in scored_prompts(case)), key=lambda q: len(prompt_ids(tok, q)))
        while demos and len(prompt_ids(tok, "".join(demos) + longest)) + room > limit:
            demos.pop()
        return demos

    def evaluation_case(self, case: EditCase) -> EditCase:
        """Every scored prompt behind the case's demonstrations and its new-fact line."""
        fact = new_fact(case)
        prefix = "".join(self.demonstrations(case))
        head = (prefix + query_text(fact, "")).replace("{}", "{ }")  # keep the template's one placeholder
        return replace(
            case, prompt=head + case.prompt,
            paraphrases=tuple(prefix + query_text(fact, p) for p in case.paraphrases),
            neighborhood=tuple((prefix + query_text(fact, p), a) for p, a in case.neighborhood),
            locality=tuple((prefix + query_text(fact, p), a) for p, a in case.locality),
            portability=tuple((prefix + query_text(fact, p), a) for p, a in case.portability))
