"""Metric families besides the CounterFact scores of bench.scoring; each is reported under its own label
and never averaged with another family.

**EasyEdit family** (teacher-forced token accuracy, as EasyEdit's ``test_prediction_acc`` and
``compute_edit_quality`` define it; Yao et al. 2023, "Editing Large Language Models", §3). For a prompt
x and an answer y = (y_1..y_m), the model reads x followed by y; token j is correct when the argmax of
the logits at the position before y_j equals y_j. A prompt's accuracy is the mean over j:

* reliability: accuracy of target_new after the rewrite prompt;
* generalization: mean accuracy of target_new over the paraphrases;
* portability: mean accuracy of each portability answer after its prompt;
* locality: for each locality prompt, the fraction of answer positions whose argmax token is the same
  after the edit as before it (EasyEdit compares post-edit to pre-edit predictions, not to the answer).

zsRE and KnowEdit are scored with this family ("top-1 token accuracy"). Differences from EasyEdit: the
prompt and the answer (with its leading space) are tokenised separately and concatenated, where EasyEdit
tokenises ``prompt + " " + answer`` in one go; for GPT-2 and Llama BPE the tokens agree whenever the prompt
does not end in a space. Per-prompt accuracies are averaged per case (EasyEdit keeps the list).

**Generation-based success** (no teacher forcing; the WILD evaluation of "The Mirage of Model Editing",
2025): greedy decoding of ``max_new_tokens`` tokens after the rewrite prompt and each paraphrase; a prompt
succeeds when the continuation contains target_new (case-insensitive).

**CounterFact extras** (Meng et al. 2022, §3.4 and Appendix):

* generation entropy GE: for a text with n-gram frequencies f_n, H_n = -Σ f_n log2 f_n, and
  GE = mean(2/3·H_2, 4/3·H_3), averaged over texts, as ROME's ``compute_n_gram_entropy`` does. The texts are
  the prompt plus its greedy continuation (ROME: top-5 sampling of 100 tokens; here greedy, 20 tokens by
  default, so the values are lower and not comparable with published GE). Words are split with a regular
  expression where ROME uses NLTK's word tokenizer.
* reference score RS: the TF-IDF cosine between the concatenated generations and the concatenated
  reference texts about target_new, computed only when a case carries reference texts. The IDF is fitted
  on the Wikipedia corpus of lmview.corpus with scikit-learn's conventions (lower-cased words of two or more
  characters, idf = ln((1+N)/(1+df)) + 1, l2-normalised raw counts); words outside the corpus vocabulary
  are dropped, as ROME's fixed-vocabulary vectorizer does.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lmview.case import EditCase
from lmview.tokens import build_batch, prompt_ids

GENERATION_MAX_NEW_TOKENS = 20
GreedyDecoder = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
ENTROPY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}
_WORD = re.compile(r"\w+|[^\w\s]")
_TFIDF_WORD = re.compile(r"(?u)\b\w\w+\b")


# --- EasyEdit family ------------------------------------------------------------------

@torch.no_grad()
def teacher_forced_predictions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                               answers: Sequence[str], device: torch.device | str, batch_size: int = 32
                               ) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, answer): (argmax token at each answer position, the answer's tokens)."""
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        batch = build_batch(tokenizer, list(prompts[start: start + batch_size]),
                            list(answers[start: start + batch_size]), device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        predicted = logits.argmax(-1).gather(1, batch.logit_pos)  # [B, J]
        for row in range(predicted.shape[0]):
            keep = batch.target_mask[row]
            out.append((predicted[row][keep].tolist(), batch.target_ids[row][keep].tolist()))
    return out


def token_accuracy(predicted: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of positions where the prediction equals the label."""
    if len(predicted) != len(labels) or not labels:
        raise ValueError(f"token_accuracy needs equal, non-empty sequences ({len(predicted)} vs {len(labels)})")
    return sum(p == t for p, t in zip(predicted, labels)) / len(labels)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items)


def easyedit_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, case: EditCase,
                    device: torch.device | str, pre_locality: list[list[int]] | None = None
                    ) -> tuple[dict[str, float], list[list[int]]]:
    """The EasyEdit family for one case, and the locality argmax tokens (to pass back after the edit).

    ``locality`` is reported only when ``pre_locality`` (the pre-edit tokens) is given.
    """
    groups: list[tuple[str, list[tuple[str, str]]]] = [
        ("reliability", [(case.rewrite_prompt, case.target_new)]),
        ("generalization", [(p, case.target_new) for p in case.paraphrases]),
        ("portability", list(case.portability)),
        ("locality", list(case.locality_pairs)),
    ]
    rows = [pair for _, pairs in groups for pair in pairs]
    predictions = teacher_forced_predictions(model, tokenizer, [p for p, _ in rows], [a for _, a in rows], device)
    scores: dict[str, float] = {}
    start = 0
    locality_tokens: list[list[int]] = []
    for name, pairs in groups:
        part = predictions[start: start + len(pairs)]
        start += len(pairs)
        if name == "locality":
            locality_tokens = [pred for pred, _ in part]
            if pre_locality is not None and part:
                scores[name] = _mean(token_accuracy(post, pre) for post, pre in zip(locality_tokens, pre_locality))
        elif part:
            scores[name] = _mean(token_accuracy(pred, labels) for pred, labels in part)
    return scores, locality_tokens


# --- greedy generation and generation-based success -------------------------------------

@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    device: torch.device | str, max_new_tokens: int = GENERATION_MAX_NEW_TOKENS,
                    batch_size: int = 16, decode: GreedyDecoder | None = None) -> list[str]:
    """The greedy continuation (text after the prompt) of each prompt, batched with left padding. With a KV
    cache unless a forward hook sits on the model (then the whole sequence is re-run at every step); `decode`
    forces one of the two."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts += _greedy_batch(model, tokenizer, list(prompts[start: start + batch_size]), device, max_new_tokens,
                               decode)
    return texts


def _greedy_batch(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  device: torch.device | str, max_new_tokens: int, decode: GreedyDecoder | None) -> list[str]:
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    if decode is None:
        decode = _greedy_tokens_recomputed if has_forward_hooks(model) else _greedy_tokens_cached
    tokens = decode(model, ids, mask, max_new_tokens)
    return tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)


# transformers installs these on first use of output_hidden_states / output_attentions and keeps them; they
# only record outputs, so they are indifferent to a KV cache
_RECORDING_HOOK_MODULES = ("transformers.utils.output_capturing",)


def _acts_on_outputs(hook: Any) -> bool:
    return getattr(hook, "__module__", None) not in _RECORDING_HOOK_MODULES


def has_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward (pre-)hook sits on the model or any submodule, or globally, other than transformers'
    output recorders, or the bridge has wrapped the modules. Editors that act through hooks (GRACE, WISE)
    may read the whole sequence at each call, which a KV cache would hide from them."""
    from torch.nn.modules import module as torch_module

    hook_dicts = [torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks]
    for module in model.modules():
        if type(module).__module__.startswith("transformer_lens."):  # a bridge component takes no KV cache
            return True
        hook_dicts += [module._forward_hooks, module._forward_pre_hooks]
    return any(_acts_on_outputs(hook) for hooks in hook_dicts for hook in hooks.values())


def _greedy_tokens_cached(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens with a KV cache: the prompt once, then one token per step (left padding kept masked)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generated, step_ids = [], ids
    for _ in range(steps):
        positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, -step_ids.shape[1]:]
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_arg: cache}).logits
        step_ids = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(step_ids)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return torch.cat(generated, dim=1)


def _greedy_tokens_recomputed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int
                              ) -> torch.Tensor:
    """Greedy tokens re-running the whole sequence at every step (what a hooked model needs)."""
    generated = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)
        generated.append(step)
        ids = torch.cat([ids, step], dim=1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    return torch.cat(generated, dim=1)


def contains_target(continuation: str, target: str) -> bool:
    """Whether the continuation mentions the target (case-insensitive, whitespace collapsed)."""
    def norm(text: str) -> str:
        return " ".join(text.split()).lower()
    return bool(target.strip()) and norm(target) in norm(continuation)


# --- generation entropy and reference consistency ---------------------------------------------

def ngram_entropy(words: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of a word sequence (0 when it has none)."""
    counts = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def generation_entropy(text: str) -> float:
    """ROME's weighted n-gram entropy of one text: mean over n of weight_n · H_n."""
    words = _WORD.findall(text)
    return _mean(weight * ngram_entropy(words, n) for n, weight in ENTROPY_WEIGHTS.items())


def mean_generation_entropy(texts: Sequence[str]) -> float:
    return _mean(generation_entropy(t) for t in texts)


def tfidf_words(text: str) -> list[str]:
    return _TFIDF_WORD.findall(text.lower())


def fit_idf(documents: Iterable[str]) -> dict[str, float]:
    """Smoothed inverse document frequency, ln((1+N)/(1+df)) + 1, of every word in the documents."""
    df: Counter[str] = Counter()
    n = 0
    for doc in documents:
        df.update(set(tfidf_words(doc)))
        n += 1
    return {word: math.log((1 + n) / (1 + count)) + 1.0 for word, count in df.items()}


def tfidf_vector(text: str, idf: dict[str, float]) -> dict[str, float]:
    """l2-normalised count·idf weights of the in-vocabulary words."""
    weights = {w: c * idf[w] for w, c in Counter(tfidf_words(text)).items() if w in idf}
    norm = math.sqrt(sum(v * v for v in weights.values()))
    return {w: v / norm for w, v in weights.items()} if norm else {}


def tfidf_cosine(a: str, b: str, idf: dict[str, float]) -> float:
    va, vb = tfidf_vector(a, idf), tfidf_vector(b, idf)
    return sum(v * vb.get(w, 0.0) for w, v in va.items())


@lru_cache(maxsize=1)
def corpus_idf() -> dict[str, float]:
    """IDF fitted once per process on the default corpus of lmview.corpus (offline Wikipedia summaries)."""
    from lmview.corpus import load_corpus

    texts, _ = load_corpus()
    return fit_idf(texts)


def reference_score(generations: Sequence[str], references: Sequence[str], idf: dict[str, float] | None = None
                    ) -> float:
    """RS: TF-IDF cosine between all generations and all reference texts, each joined into one document."""
    return tfidf_cosine(" ".join(generations), " ".join(references), corpus_idf() if idf is None else idf)


# --- one case, after the edit ----------------------------------------------------------------

def generation_metrics(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, case: EditCase,
                       device: torch.device | str, max_new_tokens: int = GENERATION_MAX_NEW_TOKENS
                       ) -> tuple[dict[str, float], dict[str, object]]:
    """Generation success, GE and (when the case has reference texts) RS; plus the texts, for inspection.

    GE uses the case's generation prompts when it has them, else the rewrite prompt and paraphrases.
    """
    success_prompts = [case.rewrite_prompt, *case.paraphrases]
    extra = list(case.generation_prompts)
    continuations = greedy_generate(model, tokenizer, success_prompts + extra, device, max_new_tokens)
    own, free = continuations[: len(success_prompts)], continuations[len(success_prompts):]
    hits = [float(contains_target(text, case.target_new)) for text in own]
    scores: dict[str, float] = {"generation_success": _mean(hits), "generation_success_rewrite": hits[0]}
    if len(hits) > 1:
        scores["generation_success_paraphrase"] = _mean(hits[1:])
    entropy_prompts, entropy_texts = (extra, free) if extra else (success_prompts, own)
    full_texts = [p + c for p, c in zip(entropy_prompts, entropy_texts)]
    scores["generation_entropy"] = mean_generation_entropy(full_texts)
    if case.reference_texts:
        scores["reference_score"] = reference_score(full_texts, case.reference_texts)
    texts = {"rewrite": own[0], "paraphrases": own[1:], "generation_prompts": free,
             "entropy_prompts": "generation_prompts" if extra else "rewrite_and_paraphrases",
             "max_new_tokens": max_new_tokens}
    return scores, texts
