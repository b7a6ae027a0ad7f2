"""Relation circuits in the harness: LRE relations (or the built-in facts) turned into prompts, known-fact
filters, splits and corrupted prompts, for circuits/relation.py, which finds and scores the circuit.

1. Facts: (subject, object) samples of the relation with prompt templates (`{}` = subject). With
   `shots = k` every prompt is preceded by k demonstrations of the same relation, as LRE (Hernandez et al.
   2024) prompts: `template(subject_i) object_i` lines, then the query. Demonstrations never hold the query's
   subject (nor contain it as text) and never have the query's answer (a difference from LRE, which only
   leaves the query's own sample out: a demonstration with the same answer would let the model copy it).
   A fact is *known* when the first token of the object is within the model's top-k next tokens after the
   prompt (k = 1 by default; `known_top_k`). Unknown facts are dropped and counted.
2. Splits. The default: subjects (not prompts) are shuffled with the seed; the first `validation_fraction`
   of the known subjects build the circuit, the rest score it (no subject in both). `kc_split`: the
   Knowledge Circuits code's split (acdc/knowledge/utils.py): one prompt per sample from the relation's
   first zero-shot template, the known facts shuffled with Python's random.seed(0), validation = the
   first N (N = 20, the README's NUM_EXAMPLES) and test = the next N (N = half the known facts if fewer).
3. Corrupted prompts (`--ablation corrupted`, and logit-diff's wrong answer): each prompt is paired with the
   same prompt about another subject of the relation of the same token length, none of whose objects shares
   the clean answer's first token (bench/corrupt.py swaps the last occurrence, i.e. the query's subject);
   prompts with no partner are dropped and counted. `zero` and `mean` ablation need no partner.

KC's data are filtered per model before the split (its README links the filtered files; the filter is not
in the repository); here the filter is the known-fact rule of step 1.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench.corrupt import corrupted_prompt
from bench.lre import Relation
from circuits.circuit import Circuit, overlap
from circuits.relation import (CHUNK, HIT_K, SIZE_GRID, CircuitResult, CircuitSetting, PromptRow, find_circuit)
from lmview.io import safe_filename
from lmview.tokens import prompt_ids, right_padded, target_ids

log = logging.getLogger("bench")

KC_EXAMPLES = 20  # the Knowledge Circuits README's NUM_EXAMPLES: validation and test prompts each
KC_SHUFFLE_SEED = 0  # acdc/knowledge/knowledge_dataset.py: random.seed(0); random.shuffle(samples)


@dataclass(frozen=True)
class Fact:
    subject: str
    object: str
    prompt: str  # the full prompt: demonstrations (if any), then the query with the subject
    context: str = ""  # the demonstrations the prompt starts with ("" zero-shot)

    @property
    def query(self) -> str:
        return self.prompt[len(self.context):]


@dataclass
class RelationSplit:
    """Known facts of one relation, split into validation (builds) and test (scores), with counts."""

    name: str
    validation: list[Fact]
    test: list[Fact]
    counts: dict[str, Any] = field(default_factory=dict)
    rule: str = "by subject"


# --- prompts -----------------------------------------------------------------------------------

def demonstrations(samples: Sequence[tuple[str, str]], subject: str, answer: str, k: int,
                   rng: random.Random) -> list[tuple[str, str]]:
    """k (subject, object) samples for the query about `subject`: other subjects (one sample each), none
    containing the query's subject as text, none with the query's answer."""
    by_subject: dict[str, str] = {}
    for s, o in samples:
        if s != subject and subject not in s and subject not in o and o != answer:
            by_subject.setdefault(s, o)
    pool = sorted(by_subject.items())
    if len(pool) < k:
        raise ValueError(f"--shots {k}: only {len(pool)} demonstrations available for '{subject}'")
    return rng.sample(pool, k)


def fill(template: str, subject: str) -> str:
    return template.replace("{}", subject)


def make_fact(template: str, subject: str, obj: str, samples: Sequence[tuple[str, str]] = (), shots: int = 0,
              seed: int = 0) -> Fact:
    """The fact's prompt, with `shots` demonstrations of the same template before it (LRE's layout)."""
    if shots == 0:
        return Fact(subject, obj, fill(template, subject))
    rng = random.Random(f"shots:{seed}:{subject}:{template}")
    context = "".join(f"{fill(template, s)} {o}\n" for s, o in demonstrations(samples, subject, obj, shots, rng))
    return Fact(subject, obj, context + fill(template, subject), context)


def relation_facts(relation: Relation, templates: Sequence[str] | None = None, shots: int = 0,
                   seed: int = 0) -> list[Fact]:
    """Every sample with every prompt template (default: the relation's `prompt_templates`)."""
    chosen = list(templates or relation.prompt_templates)
    return [make_fact(t, s, o, relation.samples, shots, seed) for s, o in relation.samples for t in chosen]


def kc_template(relation: Relation) -> str:
    """The template KC's knowledge task prompts with: the first zero-shot template (else the first one)."""
    return (relation.prompt_templates_zs or relation.prompt_templates)[0]


# --- filtering and splitting ----------------------------------------------------------------

@torch.no_grad()
def answer_ranks(model: torch.nn.Module, tokenizer, facts: list[Fact], device: torch.device) -> list[int]:
    """Rank (1 = top) of each fact's object's first token after its prompt, under the plain model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ranks: list[int] = []
    for start in range(0, len(facts), CHUNK):
        block = facts[start: start + CHUNK]
        ids, mask = right_padded([prompt_ids(tokenizer, f.prompt) for f in block], pad, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(block), device=device), mask.sum(1) - 1].float()
        answers = torch.tensor([target_ids(tokenizer, f.object)[0] for f in block], device=device)
        target = last[torch.arange(len(block), device=device), answers]
        ranks += ((last > target[:, None]).sum(-1) + 1).tolist()
    return ranks


def known_facts(bundle, facts: list[Fact], top_k: int | None) -> tuple[list[Fact], list[int]]:
    """Facts whose object's first token is within the model's top_k (all facts when top_k is None)."""
    ranks = answer_ranks(bundle.model, bundle.tokenizer, facts, bundle.device) if facts else []
    if top_k is None:
        return list(facts), ranks
    return [f for f, r in zip(facts, ranks) if r <= top_k], ranks


def split_by_subject(facts: list[Fact], validation_fraction: float, seed: int,
                     max_validation: int | None = None, max_test: int | None = None) -> tuple[list[Fact], list[Fact]]:
    """Shuffled subjects; the first fraction of them (at least one) validate, the rest test."""
    subjects = sorted({f.subject for f in facts})
    random.Random(f"split:{seed}").shuffle(subjects)
    n_val = min(max(1, round(validation_fraction * len(subjects))), len(subjects))
    if len(subjects) > 1:
        n_val = min(n_val, len(subjects) - 1)
    val_subjects = set(subjects[:n_val])
    validation = [f for f in facts if f.subject in val_subjects][:max_validation]
    test = [f for f in facts if f.subject not in val_subjects][:max_test]
    return validation, test


def kc_order(facts: list[Fact], n_examples: int = KC_EXAMPLES) -> tuple[list[Fact], list[Fact]]:
    """KC's split: the facts shuffled as `random.seed(0); random.shuffle(samples)` shuffles them, then the
    first n validate and the next n test (n = half the facts when there are fewer than 2 n)."""
    order = list(facts)
    random.Random(KC_SHUFFLE_SEED).shuffle(order)
    n = min(n_examples, len(order) // 2)
    return order[:n], order[n: 2 * n]


def _criterion(known_top_k: int | None) -> str:
    return ("all facts (no filter)" if known_top_k is None else
            "the object's first token is the model's top-1 next token" if known_top_k == 1 else
            f"the object's first token is within the model's top {known_top_k} next tokens")


def _counts(facts: list[Fact], known: list[Fact], ranks: list[int], known_top_k: int | None,
            validation: list[Fact], test: list[Fact]) -> dict[str, Any]:
    return {"prompts_total": len(facts), "subjects_total": len({f.subject for f in facts}),
            "known_criterion": _criterion(known_top_k), "prompts_known": len(known),
            "subjects_known": len({f.subject for f in known}),
            "full_model_hit_at_10_all_prompts": sum(r <= HIT_K for r in ranks) / len(ranks) if ranks else None,
            "validation_prompts_before_pairing": len(validation), "test_prompts_before_pairing": len(test),
            "subjects_in_both_splits": len({f.subject for f in validation} & {f.subject for f in test})}


def prepare_split(bundle, name: str, facts: list[Fact], samples: Sequence[tuple[str, str]] = (), *,
                  known_top_k: int | None = 1, validation_fraction: float = 0.5, seed: int = 0,
                  max_validation: int | None = 32, max_test: int | None = 64) -> RelationSplit:
    """Known facts, split by subject. Counts: total, known, split sizes."""
    known, ranks = known_facts(bundle, facts, known_top_k)
    validation, test = split_by_subject(known, validation_fraction, seed, max_validation, max_test)
    rule = (f"by subject: {validation_fraction:g} of the known subjects (shuffled with seed {seed}) validate, "
            f"the rest test; at most {max_validation} validation and {max_test} test prompts")
    return RelationSplit(name, validation, test, _counts(facts, known, ranks, known_top_k, validation, test), rule)


def kc_split(bundle, name: str, facts: list[Fact], *, known_top_k: int | None = 1,
             n_examples: int = KC_EXAMPLES) -> RelationSplit:
    """Known facts in KC's split (`kc_order`)."""
    known, ranks = known_facts(bundle, facts, known_top_k)
    validation, test = kc_order(known, n_examples)
    rule = (f"KC: known facts shuffled as random.seed({KC_SHUFFLE_SEED}); random.shuffle; the first "
            f"{len(validation)} validate, the next {len(test)} test")
    return RelationSplit(name, validation, test, _counts(facts, known, ranks, known_top_k, validation, test), rule)


# --- prompt rows -------------------------------------------------------------------------------



def query_start(tokenizer, fact: Fact) -> int:
    """The first token position of the query (0 zero-shot): the first token that starts at or after the end
    of the demonstrations."""
    if not fact.context:
        return 0
    offsets = tokenizer(fact.prompt, return_offsets_mapping=True)["offset_mapping"]
    boundary = len(fact.context)
    return next(i for i, (a, b) in enumerate(offsets) if b > a and a >= boundary)


def corruption_pool(tokenizer, samples: Sequence[tuple[str, str]], fact: Fact) -> dict[str, int]:
    """Subjects that may replace the fact's subject, with their answer's first token: none of a subject's
    objects may share the clean answer's first token (one-to-many relations list a subject several times)."""
    answer = target_ids(tokenizer, fact.object)[0]
    firsts: dict[str, set[int]] = {}
    for s, o in samples:
        firsts.setdefault(s, set()).add(target_ids(tokenizer, o)[0])
    return {s: min(ids) for s, ids in firsts.items() if s != fact.subject and answer not in ids}


def pair_rows(tokenizer, facts: list[Fact], samples: Sequence[tuple[str, str]], seed: int,
              need_partner: bool = True) -> tuple[list[PromptRow], list[Fact]]:
    """A row per fact; with need_partner, only the facts that have a corrupting subject (its prompt of the
    same token length), and those facts."""
    rows, kept = [], []
    for fact in facts:
        clean, answer = prompt_ids(tokenizer, fact.prompt), target_ids(tokenizer, fact.object)[0]
        start = query_start(tokenizer, fact)
        if not need_partner:
            rows.append(PromptRow(clean, clean, answer, None, start))
            kept.append(fact)
            continue
        pool = corruption_pool(tokenizer, samples, fact)
        candidates = sorted(pool)
        random.Random(f"{seed}:{fact.subject}:{fact.prompt}").shuffle(candidates)
        for other in candidates:
            corrupt = corrupted_prompt(tokenizer, fact.prompt, fact.subject, [other], random.Random(0))
            if corrupt is not None:
                rows.append(PromptRow(clean, corrupt, answer, pool[other], start))
                kept.append(fact)
                break
    return rows, kept




@dataclass
class RelationCircuitResult(CircuitResult):
    test_facts: list[Fact] = field(default_factory=list)


def _pairs(bundle, split: RelationSplit, samples, setting: CircuitSetting, seed: int):
    tok = bundle.tokenizer
    val_rows, val_facts = pair_rows(tok, split.validation, samples, seed, setting.needs_partner)
    test_rows, test_facts = pair_rows(tok, split.test, samples, seed, setting.needs_partner)
    if not val_rows or not test_rows:
        raise ValueError(f"relation '{split.name}': too few known facts with a corruption partner "
                         f"({len(val_rows)} validation, {len(test_rows)} test prompts); "
                         "try --shots 3, --known-top-k 10 or another relation")
    return val_rows, val_facts, test_rows, test_facts


def build_relation_circuit(bundle, split: RelationSplit, samples: Sequence[tuple[str, str]], *,
                           setting: CircuitSetting = CircuitSetting(), top_n: int | None = None,
                           size_grid: Sequence[int] = SIZE_GRID, seed: int = 0, random_draws: int = 3,
                           curve: bool = True, acdc_batch: int = 1,
                           progress: Callable[[str], None] = log.info) -> RelationCircuitResult:
    """The split's facts as prompt rows (with corrupting subjects when the setting needs them), then
    `circuits.relation.find_circuit`; the report also states the split and the fact counts."""
    val_rows, val_facts, test_rows, test_facts = _pairs(bundle, split, samples, setting, seed)
    found = find_circuit(bundle, f"relation:{split.name}", val_rows, test_rows, setting=setting, top_n=top_n,
                         size_grid=size_grid, seed=seed, random_draws=random_draws, curve=curve,
                         acdc_batch=acdc_batch, progress=progress)
    report = {"relation": split.name, **found.report}
    report["setting"] = dict(found.report["setting"], split=split.rule, known=split.counts.get("known_criterion"))
    report["facts"] = dict(split.counts, validation_prompts=len(val_rows), test_prompts=len(test_rows),
                           validation_subjects=len({f.subject for f in val_facts}),
                           test_subjects=len({f.subject for f in test_facts}))
    return RelationCircuitResult(found.circuit, found.keep, found.scores, found.test, report, found.circuit_run,
                                 test_facts)


def facts_as_dicts(facts: list[Fact]) -> list[dict[str, str]]:
    return [asdict(f) for f in facts]


# --- relation circuits around edits (`bench run --relation-circuits`) ---------------------------------

# The run's relation names that have an LRE file under another name: the built-in facts' relations and
# CounterFact's Wikidata relation ids. A relation named like an LRE file maps to it directly.
LRE_ALIASES = {
    "country_capital": "country_capital_city", "country_language": "country_language",
    "city_country": "city_in_country", "landmark_country": "landmark_in_country",
    "country_currency": "country_currency", "product_company": "product_by_company",
    "person_occupation": "person_occupation", "person_instrument": "person_plays_instrument",
    "P36": "country_capital_city", "P37": "country_language", "P103": "person_native_language",
    "P106": "person_occupation", "P1303": "person_plays_instrument", "P176": "product_by_company",
    "P641": "person_plays_pro_sport", "P413": "person_plays_position_in_sport",
}
MIN_RELATION_FACTS = 4


@dataclass
class RelationSource:
    name: str  # "lre:<stem>" or "facts:<relation>"
    facts: list[Fact]
    samples: list[tuple[str, str]]


def relation_source(relation: str, lre_root=None) -> RelationSource | None:
    """The facts of a run case's relation: its LRE file (by name or LRE_ALIASES) when the LRE data is
    present, else the built-in facts file's cases of that relation (their rewrite prompts); None when
    neither has at least MIN_RELATION_FACTS facts."""
    from bench.data import load_dataset
    from bench.lre import LRE_ROOT, load_relation
    from lmview.case import DatasetError

    root = lre_root or LRE_ROOT
    for stem in dict.fromkeys([relation, LRE_ALIASES.get(relation, relation)]):
        if list(root.glob(f"*/{stem}.json")):
            lre = load_relation(stem, root)
            return RelationSource(f"lre:{lre.name}", relation_facts(lre), list(lre.samples))
    try:
        cases = [c for c in load_dataset("facts").cases if c.relation == relation]
    except DatasetError:
        return None
    if len(cases) < MIN_RELATION_FACTS:
        return None
    return RelationSource(f"facts:{relation}", [Fact(c.subject, c.target_true, c.rewrite_prompt) for c in cases],
                          [(c.subject, c.target_true) for c in cases])


@dataclass
class RelationState:
    """A relation circuit and its per-test-prompt Hit@10, full model and circuit."""

    circuit: Circuit
    test_facts: list[Fact]
    hit_full: list[bool]
    hit_circuit: list[bool]


class RelationCircuits:
    """Per run: each relation's pre-edit circuit (computed once, kept in memory) and, after each edit,
    the rediscovered circuit with its overlap and Hit@10 change. With top_n None the pre-edit circuit's
    size is chosen on its validation split (`select_size`) and the post-edit circuit has the same size. The edited case's own subject is left
    out of the Hit@10 means (its answer is meant to change); it may still be among the validation
    prompts that build the circuit. The pre-edit circuit is measured before the first edited case of
    its relation (in sequential mode: after the edits made before that case)."""

    def __init__(self, bundle, top_n: int | None, seed: int, known_top_k: int | None, lre_root=None,
                 max_validation: int = 32, max_test: int = 32, setting: CircuitSetting = CircuitSetting()):
        self.bundle, self.top_n, self.seed, self.known_top_k = bundle, top_n, seed, known_top_k
        self.lre_root, self.max_validation, self.max_test = lre_root, max_validation, max_test
        self.setting = setting
        self.sources: dict[str, RelationSource | None] = {}
        self.splits: dict[str, RelationSplit | str] = {}
        self.pre: dict[str, RelationState | str] = {}

    def _source(self, relation: str) -> RelationSource | None:
        if relation not in self.sources:
            self.sources[relation] = relation_source(relation, self.lre_root)
        return self.sources[relation]

    def _measure(self, relation: str, top_n: int | None = None) -> RelationState | str:
        """The relation circuit on the current weights (top_n edges, else self.top_n, else sized on
        validation), or why there is none."""
        source = self._source(relation)
        if source is None:
            return f"relation '{relation}' has no LRE file and fewer than {MIN_RELATION_FACTS} built-in facts"
        if relation not in self.splits:
            facts = source.facts
            if self.setting.shots:
                facts = [make_fact(f.prompt.replace(f.subject, "{}", 1), f.subject, f.object, source.samples,
                                   self.setting.shots, self.seed) for f in facts]
            self.splits[relation] = prepare_split(self.bundle, source.name, facts, source.samples,
                                                  known_top_k=self.known_top_k, seed=self.seed,
                                                  max_validation=self.max_validation, max_test=self.max_test)
        try:
            result = build_relation_circuit(self.bundle, self.splits[relation], source.samples,
                                            setting=self.setting, top_n=top_n or self.top_n, seed=self.seed,
                                            random_draws=0, curve=False, progress=log.debug)
        except ValueError as exc:
            return str(exc)
        return RelationState(result.circuit, result.test_facts, result.test.clean.hit.tolist(),
                             result.circuit_run.hit.tolist())

    def before_edit(self, relation: str) -> None:
        if relation not in self.pre:
            self.pre[relation] = self._measure(relation)

    def after_edit(self, relation: str, subject: str, circuit_dir=None, case_id: str = "case") -> dict[str, Any]:
        """Record fields: the relation circuit's overlap with its pre-edit version and Hit@10 changes."""
        self.before_edit(relation)  # no-op when measured before the edit, as it should be
        pre = self.pre[relation]
        if isinstance(pre, str):
            return {"relation_circuit_note": pre}
        post = self._measure(relation, top_n=len(pre.circuit.edges))  # the pre-edit circuit's size
        if isinstance(post, str):
            return {"relation_circuit_note": post}
        fields: dict[str, Any] = {"relation_circuit_source": self.sources[relation].name}
        fields.update({f"relation_circuit_{k}": v for k, v in overlap(pre.circuit, post.circuit).items()})
        others = [i for i, f in enumerate(pre.test_facts) if f.subject != subject]
        fields["relation_circuit_n_test"] = len(others)
        for tag, state in (("pre", pre), ("post", post)):
            fields[f"relation_hit10_full_{tag}"] = _mean_at(state.hit_full, others)
            fields[f"relation_hit10_circuit_{tag}"] = _mean_at(state.hit_circuit, others)
        for kind in ("full", "circuit"):
            a, b = fields[f"relation_hit10_{kind}_pre"], fields[f"relation_hit10_{kind}_post"]
            fields[f"relation_hit10_{kind}_delta"] = None if a is None or b is None else b - a
        if circuit_dir is not None:
            _save_relation_circuits(circuit_dir, relation, case_id, pre.circuit, post.circuit)
        return fields


def _mean_at(values: list[bool], index: list[int]) -> float | None:
    return sum(values[i] for i in index) / len(index) if index else None


def _save_relation_circuits(folder, relation: str, case_id: str, pre: Circuit, post: Circuit) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pre_path = folder / f"relation-{safe_filename(relation)}.pre.json"
    if not pre_path.exists():
        pre.save(pre_path)
    post.save(folder / f"{safe_filename(case_id)}.relation.post.json")


_RUN_CACHES: dict[int, tuple[Any, RelationCircuits]] = {}


def relation_setting(cfg) -> CircuitSetting:
    """The run's circuit setting (ablation, metric, shots, graph where the run config has them)."""
    return CircuitSetting(ablation=getattr(cfg, "ablation", "corrupted"), metric=getattr(cfg, "metric", "logprob"),
                          shots=getattr(cfg, "shots", 0), graph=getattr(cfg, "graph", None))


def relation_circuits_for(bundle, cfg) -> RelationCircuits:
    """The run's RelationCircuits, one per RunConfig object (the config is kept alive with it, so its
    id identifies the run). Each relation circuit's size is chosen on its validation split (the run's
    --top-n sizes the per-case circuits); facts are filtered to known ones (top-1) unless the run keeps
    all cases."""
    key = id(cfg)
    if key not in _RUN_CACHES or _RUN_CACHES[key][0] is not cfg:
        known = 1 if getattr(cfg, "only_known", True) else None
        _RUN_CACHES[key] = (cfg, RelationCircuits(bundle, None, cfg.seed, known, setting=relation_setting(cfg)))
    return _RUN_CACHES[key][1]
