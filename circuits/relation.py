"""Relation-level knowledge circuits (Yao et al. 2024, Sec. 3-4) on LRE-format relation files.

One circuit per relation:

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
3. Ablation (`circuits/ablation.py`): `corrupted` pairs each prompt with the same prompt about another
   subject of the relation of the same token length, none of whose objects shares the clean answer's first
   token (bench/corrupt.py swaps the last occurrence, i.e. the query's subject); prompts with no partner are
   dropped and counted. `zero` and `mean` need no partner (mean: each sender's output averaged over the
   validation prompts' query positions). With demonstrations, only the query's positions are ablated; the
   demonstrations always run clean, so the circuit is read at the query's positions.
4. The circuit: edge attributions (EAP by default; any method of `circuits.attribute.attribute`) with the
   chosen metric (circuits/metrics.py), summed over the validation prompts and divided by their number,
   and the top-n edges by |score|. The size n is either given, or chosen on the validation split alone:
   the smallest size of SIZE_GRID whose circuit reaches the full model's validation Hit@10 (else the size
   with the best validation Hit@10). The test split is read only after the size is fixed.
5. Evaluation on both splits (the paper's Table 1): Hit@10 of the full model, of the circuit (edges outside
   it carry their ablated value, `circuits.evaluate.patched_logits`), and of random circuits with as many
   edges (uniform over the graph's edges; mean of `random_draws` draws). Hit@10 = the answer's first token
   is among the 10 largest logits at the last prompt position (KC's `get_hit10`). Also the normalised
   faithfulness (m(C) - m(ablated)) / (m(full) - m(ablated)) with the chosen metric (undefined when the
   denominator is below 1e-9), and the MIB faithfulness curve with CPR/CMD on the test split.

Differences from the paper (KC): its Table 1 circuits come from ACDC with threshold tau = 0.01 on the
validation split; here they come from attribution scores (EAP), with the size chosen on the validation
split by the rule above. KC's data are filtered per model before the split (its README links the filtered
files; the filter is not in the repository); here the filter is the known-fact rule of step 1.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from bench.corrupt import corrupted_prompt
from bench.lre import Relation
from bench.tokens import prompt_ids, target_ids
from circuits.ablation import ablated_outputs, check_ablation
from circuits.activations import PairBatch
from circuits.attribute import attribute, check_method
from circuits.circuit import Circuit, circuit_nodes, top_edges
from circuits.curve import faithfulness_curve, normalized_faithfulness
from circuits.evaluate import patched_logits
from circuits.graph import Graph
from circuits.metrics import Metric, prepared_metric

log = logging.getLogger("bench")

HIT_K = 10
# Candidate circuit sizes for the validation rule (step 4 of the module doc).
SIZE_GRID = (25, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
CHUNK = 8  # prompts per forward pass; bounds the [n_upstream, B, P, D] activation buffers
KC_EXAMPLES = 20  # the Knowledge Circuits README's NUM_EXAMPLES: validation and test prompts each
KC_SHUFFLE_SEED = 0  # acdc/knowledge/knowledge_dataset.py: random.seed(0); random.shuffle(samples)


@dataclass(frozen=True)
class CircuitSetting:
    """How a relation circuit is built and scored."""

    method: str = "eap"
    ablation: str = "corrupted"
    metric: str = "logprob"
    shots: int = 0
    graph: str | None = None  # "ungrouped" or "grouped" k/v receivers; None: circuits.graph's default

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        check_method(self.method, self.ablation)
        Metric(self.metric)  # validates the name
        if self.shots < 0:
            raise ValueError("--shots must be 0 or more")

    @property
    def needs_partner(self) -> bool:
        """Corrupted patching, and logit-diff's wrong answer, need a corrupting subject per prompt."""
        return self.ablation == "corrupted" or self.metric == "logit-diff"


KC_SETTING = CircuitSetting(method="eap", ablation="zero", metric="match-nll")


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

def _padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def answer_ranks(model: torch.nn.Module, tokenizer, facts: list[Fact], device: torch.device) -> list[int]:
    """Rank (1 = top) of each fact's object's first token after its prompt, under the plain model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ranks: list[int] = []
    for start in range(0, len(facts), CHUNK):
        block = facts[start: start + CHUNK]
        ids, mask = _padded([prompt_ids(tokenizer, f.prompt) for f in block], pad, device)
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

@dataclass(frozen=True)
class PromptRow:
    """One prompt, tokenised: clean ids, corrupted ids of the same length (the clean ids when no partner is
    needed), the answer's first token, the corrupting subject's answer token, and where the query starts."""

    clean: list[int]
    corrupt: list[int]
    answer: int
    corrupt_answer: int | None = None
    query_start: int = 0


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


def batches(rows: list[PromptRow], tokenizer, device: torch.device, chunk: int = CHUNK) -> list[PairBatch]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(rows), chunk):
        block = rows[i: i + chunk]
        wrong = [r.corrupt_answer for r in block]
        starts = [r.query_start for r in block]
        out.append(PairBatch.from_rows([(r.clean, r.corrupt, r.answer) for r in block], pad, device,
                                       corrupt_answers=None if None in wrong else wrong,
                                       ablate_from=starts if any(starts) else None))
    return out


def reference_batch(rows: list[PromptRow], tokenizer, device: torch.device) -> PairBatch:
    """All validation rows in one batch: the mean ablation's reference set."""
    return batches(rows, tokenizer, device, chunk=max(1, len(rows)))[0]


# --- attribution --------------------------------------------------------------------------------

def graph_of(arch, kind: str | None = None) -> Graph:
    """The model's edge graph (`kind`: "ungrouped" or "grouped" k/v receivers; None: the default)."""
    of = getattr(Graph, "of", None)
    if of is not None:
        return of(arch) if kind is None else of(arch, kind)
    if kind not in (None, "grouped"):
        raise ValueError(f"graph '{kind}' is not available in this version; use grouped")
    return Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)


def graph_kind(graph: Graph) -> str:
    return getattr(graph, "kind", "ungrouped" if graph.n_kv_heads == graph.n_heads else "grouped")


def relation_scores(bundle, graph: Graph, chunks: list[PairBatch], setting: CircuitSetting = CircuitSetting(),
                    reference: PairBatch | None = None) -> torch.Tensor:
    """Mean attribution per validation prompt [n_upstream, n_receivers], accumulated chunk by chunk."""
    total = None
    for batch in chunks:
        scores = attribute(bundle.bridge(), bundle.model, bundle.arch, graph, batch, setting.method,
                           metric=setting.metric, ablation=setting.ablation, reference=reference).float()
        total = scores if total is None else total + scores
    n_rows = sum(b.clean_ids.shape[0] for b in chunks)
    return total / n_rows


def circuit_from_scores(scores: torch.Tensor, graph: Graph, top_n: int, method: str, answer: str,
                        settings: dict[str, Any] | None = None) -> tuple[Circuit, torch.Tensor]:
    keep = top_edges(scores, graph, top_n)
    up, recv = keep.nonzero(as_tuple=True)
    values = scores[up, recv].tolist()
    edges = {graph.edge_name(u, r): v for u, r, v in zip(up.tolist(), recv.tolist(), values)}
    return Circuit(method=method, answer=answer, edges=edges, nodes=circuit_nodes(keep, graph),
                   n_graph_edges=graph.n_edges, settings=dict(settings or {}, top_n=top_n)), keep


def random_edges(graph: Graph, n: int, seed: int) -> torch.Tensor:
    """A [n_upstream, n_receivers] mask of n edges drawn uniformly without replacement."""
    existing = graph.edge_mask.nonzero()
    pick = existing[torch.randperm(len(existing), generator=torch.Generator().manual_seed(seed))[:n]]
    keep = torch.zeros_like(graph.edge_mask)
    keep[pick[:, 0], pick[:, 1]] = True
    return keep


# --- evaluation ------------------------------------------------------------------------------------

def hits(logits: torch.Tensor, batch: PairBatch, k: int = HIT_K) -> torch.Tensor:
    """[B] bool: the answer's first token is among the k largest logits at the answer position. Ties count
    against the answer (a run whose logits are all equal, e.g. RMSNorm of a zero-ablated residual, hits
    nothing)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.answer_pos].float()
    target = last[rows, batch.answer_ids]
    return (last >= target[:, None]).sum(-1) - 1 < k


@dataclass
class Measured:
    """Per-row metric values and Hit@10 of one way of running the model."""

    value: torch.Tensor
    hit: torch.Tensor

    def summary(self) -> dict[str, float]:
        return {"metric": float(self.value.mean()), "hit_at_10": float(self.hit.float().mean())}


class ScoringSet:
    """One split's prompts in chunks, with their clean and ablated runs cached for repeated patching."""

    def __init__(self, bundle, graph: Graph, chunks: list[PairBatch], setting: CircuitSetting = CircuitSetting(),
                 reference: PairBatch | None = None):
        self.bundle, self.graph, self.chunks, self.setting = bundle, graph, chunks, setting
        self.ablated: list[torch.Tensor] = []
        self.metrics: list[Metric] = []
        clean, ablated = [], []
        bridge, model, arch = bundle.bridge(), bundle.model, bundle.arch
        with torch.no_grad():
            for batch in chunks:
                clean_logits = bridge.run_with_hooks(batch.clean_ids, fwd_hooks=[], attention_mask=batch.attention_mask)
                outputs, ablated_logits = ablated_outputs(bridge, graph, arch, model, batch, setting.ablation, reference)
                if setting.ablation == "zero" and batch.ablate_mask is None:
                    outputs = outputs.new_zeros(()).expand(outputs.shape)  # no [n_upstream, B, P, D] buffer kept
                if ablated_logits is None:
                    ablated_logits = patched_logits(bridge, model, arch, graph, batch,
                                                    torch.zeros_like(graph.edge_mask), outputs)
                metric = prepared_metric(bridge, batch, setting.metric, clean_logits=clean_logits,
                                         corrupt_logits=ablated_logits)
                self.ablated.append(outputs)
                self.metrics.append(metric)
                clean.append((metric(clean_logits, batch), hits(clean_logits, batch)))
                ablated.append((metric(ablated_logits, batch), hits(ablated_logits, batch)))
        self.clean = Measured(*map(torch.cat, zip(*clean)))
        self.corrupted = Measured(*map(torch.cat, zip(*ablated)))  # every edge ablated

    @property
    def n_prompts(self) -> int:
        return int(self.clean.value.shape[0])

    def with_edges(self, keep: torch.Tensor) -> Measured:
        """The model with only `keep`'s edges clean; every other edge carries its ablated value."""
        parts = []
        bridge, model, arch = self.bundle.bridge(), self.bundle.model, self.bundle.arch
        for batch, outputs, metric in zip(self.chunks, self.ablated, self.metrics):
            logits = patched_logits(bridge, model, arch, self.graph, batch, keep.to(outputs.device), outputs)
            parts.append((metric(logits, batch), hits(logits, batch)))
        return Measured(*map(torch.cat, zip(*parts)))

    def faithfulness(self, measured: Measured) -> float:
        return normalized_faithfulness(float(measured.value.mean()), float(self.clean.value.mean()),
                                       float(self.corrupted.value.mean()))

    def faithfulness_block(self, measured: Measured) -> dict[str, float]:
        return {"clean": float(self.clean.value.mean()), "ablated": float(self.corrupted.value.mean()),
                "circuit": float(measured.value.mean()), "faithfulness": self.faithfulness(measured)}


def hit_table(scoring: ScoringSet, keep: torch.Tensor, random_draws: int, seed: int) -> tuple[dict[str, Any], Measured]:
    """The paper's Table 1 row: Hit@10 of the full model, the circuit and same-size random circuits."""
    n_edges = int(keep.sum())
    circuit = scoring.with_edges(keep)
    random_hits = [float(scoring.with_edges(random_edges(scoring.graph, n_edges, seed + i)).hit.float().mean())
                   for i in range(random_draws)]
    table = {"full_model": float(scoring.clean.hit.float().mean()), "circuit": float(circuit.hit.float().mean()),
             "random_circuit": sum(random_hits) / len(random_hits) if random_hits else None,
             "random_circuit_draws": random_hits, "ablated_model": float(scoring.corrupted.hit.float().mean()),
             "n_prompts": scoring.n_prompts, "n_edges": n_edges, "n_graph_edges": scoring.graph.n_edges, "k": HIT_K}
    return table, circuit


def select_size(validation: ScoringSet, scores: torch.Tensor, grid: Sequence[int] = SIZE_GRID,
                progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """The smallest size of the grid whose circuit reaches the full model's Hit@10 on the validation split,
    else the size with the best validation Hit@10 (the smallest among ties). Reads the validation set only."""
    graph = validation.graph
    target = float(validation.clean.hit.float().mean())
    sizes = sorted({min(n, graph.n_edges) for n in grid if n >= 1})
    tried: list[dict[str, float]] = []
    for n in sizes:
        hit = float(validation.with_edges(top_edges(scores, graph, n)).hit.float().mean())
        tried.append({"n_edges": n, "validation_hit_at_10": hit})
        progress(f"circuit: size {n}: validation Hit@10 {hit:.3f} (full model {target:.3f})")
        if hit >= target - 1e-9:
            return {"chosen": n, "reached_full_model": True, "full_model_validation_hit_at_10": target,
                    "tried": tried}
    best = max(tried, key=lambda t: (t["validation_hit_at_10"], -t["n_edges"]))
    return {"chosen": int(best["n_edges"]), "reached_full_model": False,
            "full_model_validation_hit_at_10": target, "tried": tried}


SIZE_RULE = ("the smallest size of the grid whose circuit reaches the full model's validation Hit@10 "
             "(else the best validation Hit@10); chosen on the validation split only")


@dataclass
class RelationCircuitResult:
    circuit: Circuit
    keep: torch.Tensor
    scores: torch.Tensor
    test: ScoringSet
    report: dict[str, Any]
    test_facts: list[Fact]
    circuit_run: Measured  # the circuit's per-test-prompt metric values and hits


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
                           curve: bool = True, progress: Callable[[str], None] = log.info) -> RelationCircuitResult:
    """Builds the circuit on the validation split, sizes it there (top_n None) and scores it on both splits."""
    tok, dev = bundle.tokenizer, bundle.device
    val_rows, val_facts, test_rows, test_facts = _pairs(bundle, split, samples, setting, seed)
    graph = graph_of(bundle.arch, setting.graph)
    reference = reference_batch(val_rows, tok, dev) if setting.ablation == "mean" else None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    progress(f"circuit: {setting.method} attribution ({setting.ablation} ablation, {setting.metric}) over "
             f"{len(val_rows)} validation prompts ({graph.n_edges} edges)")
    scores = relation_scores(bundle, graph, batches(val_rows, tok, dev), setting, reference)
    timings["attribution"] = time.perf_counter() - start

    start = time.perf_counter()
    validation = ScoringSet(bundle, graph, batches(val_rows, tok, dev), setting, reference)
    if top_n is None:
        sizing = dict(select_size(validation, scores, size_grid, progress), rule=SIZE_RULE,
                      grid=sorted(set(size_grid)))
    else:
        sizing = {"rule": f"fixed: --top-n {top_n}", "chosen": min(top_n, graph.n_edges)}
    timings["size_selection"] = time.perf_counter() - start
    n_edges = sizing["chosen"]
    circuit, keep = circuit_from_scores(scores, graph, n_edges, setting.method, f"relation:{split.name}",
                                        {"validation_prompts": len(val_rows), "test_prompts": len(test_rows),
                                         "scores": "mean attribution per validation prompt", **asdict(setting)})

    start = time.perf_counter()
    progress(f"circuit: scoring {len(circuit.edges)} edges on {len(val_rows)} validation and "
             f"{len(test_rows)} test prompts")
    val_table, val_run = hit_table(validation, keep, random_draws, seed)
    val_faith = validation.faithfulness_block(val_run)
    del validation
    test = ScoringSet(bundle, graph, batches(test_rows, tok, dev), setting, reference)  # after the size is fixed
    test_table, circuit_run = hit_table(test, keep, random_draws, seed)
    metric_doc = {"logprob": "log p(answer's first token) at the last prompt position",
                  "logit-diff": "logit(answer) - logit(corrupting subject's answer) at the last prompt position",
                  "match-nll": "NLL(answer) - NLL(answer) under the full model (KC's match_nll)"}[setting.metric]
    faith = {"metric": f"{metric_doc}, mean over the split's prompts", "validation": val_faith,
             "test": test.faithfulness_block(circuit_run)}
    faith["faithfulness"] = faith["test"]["faithfulness"]
    circuit.metrics = {"metric_clean": faith["test"]["clean"], "metric_corrupted": faith["test"]["ablated"],
                       "metric_circuit": faith["test"]["circuit"], "faithfulness": faith["faithfulness"],
                       "hit_at_10_full": test_table["full_model"], "hit_at_10_circuit": test_table["circuit"]}
    timings["evaluation"] = time.perf_counter() - start
    report: dict[str, Any] = {
        "relation": split.name, "method": setting.method, "top_n": n_edges, "seed": seed,
        "setting": {"method": setting.method, "ablation": setting.ablation, "metric": setting.metric,
                    "graph": graph_kind(graph), "split": split.rule, "shots": setting.shots,
                    "size_rule": sizing["rule"], "known": split.counts.get("known_criterion"),
                    "hit_k": HIT_K, "circuit_read_at": "the query's positions" if setting.shots else "all positions"},
        "facts": dict(split.counts, validation_prompts=len(val_rows), test_prompts=len(test_rows),
                      validation_subjects=len({f.subject for f in val_facts}),
                      test_subjects=len({f.subject for f in test_facts})),
        "size_selection": sizing,
        "circuit": {"n_edges": len(circuit.edges), "n_nodes": len(circuit.nodes), "n_graph_edges": graph.n_edges,
                    "scores": "mean attribution per validation prompt"},
        "faithfulness": faith,
        "hit_at_10": {"validation": val_table, "test": test_table},
    }
    if curve:
        start = time.perf_counter()
        progress("circuit: faithfulness curve on the test split (10 sizes)")
        report["faithfulness_curve"] = faithfulness_curve(
            lambda k: test.faithfulness(test.with_edges(top_edges(scores, graph, k))), graph.n_edges)
        timings["curve"] = time.perf_counter() - start
    report["seconds"] = timings
    return RelationCircuitResult(circuit, keep, scores, test, report, test_facts, circuit_run)


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
    from bench.data import DatasetError, load_dataset
    from bench.lre import LRE_ROOT, load_relation

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
        fields.update({f"relation_circuit_{k}": v for k, v in overlap_of(pre.circuit, post.circuit).items()})
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


def overlap_of(pre: Circuit, post: Circuit) -> dict[str, float]:
    from circuits.circuit import overlap

    return overlap(pre, post)


def _mean_at(values: list[bool], index: list[int]) -> float | None:
    return sum(values[i] for i in index) / len(index) if index else None


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def _save_relation_circuits(folder, relation: str, case_id: str, pre: Circuit, post: Circuit) -> None:
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pre_path = folder / f"relation-{_safe_name(relation)}.pre.json"
    if not pre_path.exists():
        pre.save(pre_path)
    post.save(folder / f"{_safe_name(case_id)}.relation.post.json")


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
