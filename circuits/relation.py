"""Relation-level knowledge circuits (Yao et al. 2024, Sec. 3-4) on LRE-format relation files.

One circuit per relation:

1. Facts: every (subject, object) sample of the relation with every prompt template (`prompt_templates`,
   `{}` = subject). A fact is *known* when the first token of the object is within the model's top-k
   next tokens after the prompt (k = 1 by default, greedy; `known_top_k`). Unknown facts are dropped and
   counted.
2. Subjects (not prompts) are shuffled with the seed and split: the first `validation_fraction` of the
   known subjects build the circuit, the rest score it, so the two splits share no subject.
3. Each prompt is paired with a corrupted prompt: the subject swapped for another subject of the relation
   with a different object and the same prompt token length (bench/corrupt.py). Prompts with no such
   partner are dropped and counted.
4. The circuit: edge attributions summed over the validation prompts (EAP by default; any method of
   `circuits.attribute.attribute`), divided by their number (a mean; the ranking is the sum's), and the
   top-n edges by |score|.
5. Evaluation on the test prompts (the paper's Table 1): Hit@10 of the full model, of the circuit (edges
   outside it carry their corrupted-prompt activations, `circuits.evaluate.patched_logits`), and of random
   circuits with as many edges (uniform over the graph's edges; mean of `random_draws` draws). Hit@10 =
   the answer's first token is among the 10 largest logits at the last prompt position. Also the
   normalised faithfulness and the MIB faithfulness curve with CPR/CMD (circuits/curve.py).

Differences from the paper: its Hit@10 counts all test facts and its circuits are pruned with ACDC-style
zero ablation; here the facts are filtered to known ones first, and edges outside the circuit take the
corrupted prompt's activations (the harness's patching; see circuits/evaluate.py).
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
from circuits.activations import PairBatch, answer_logprob, run_capture
from circuits.attribute import attribute
from circuits.circuit import Circuit, circuit_nodes, top_edges
from circuits.curve import faithfulness_curve, normalized_faithfulness
from circuits.evaluate import patched_logits
from circuits.graph import Graph

log = logging.getLogger("bench")

HIT_K = 10
# Relation circuits' default size: on SmolLM2-135M's country_capital_city (EAP) 700 of 70,651 edges give
# the full model's test Hit@10 (300 edges: 0.71); the paper's circuits have a few hundred to ~1000 edges.
RELATION_TOP_N = 700
CHUNK = 16  # prompts per forward pass; bounds the [n_upstream, B, P, D] activation buffers


@dataclass(frozen=True)
class Fact:
    subject: str
    object: str
    prompt: str  # the full prompt, subject included


@dataclass
class RelationSplit:
    """Known facts of one relation, split into validation (builds) and test (scores), with counts."""

    name: str
    validation: list[Fact]
    test: list[Fact]
    counts: dict[str, Any] = field(default_factory=dict)


def relation_facts(relation: Relation, templates: Sequence[str] | None = None) -> list[Fact]:
    """Every sample with every prompt template."""
    chosen = list(templates or relation.prompt_templates)
    return [Fact(s, o, t.replace("{}", s)) for s, o in relation.samples for t in chosen]


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


# --- clean/corrupted pairs --------------------------------------------------------------------

def pair_rows(tokenizer, facts: list[Fact], samples: Sequence[tuple[str, str]], seed: int
              ) -> tuple[list[tuple[list[int], list[int], int]], list[Fact]]:
    """(clean ids, corrupted ids, answer id) per fact that has a corruption partner; and those facts."""
    rows, kept = [], []
    for fact in facts:
        pool = sorted({s for s, o in samples if o != fact.object and s != fact.subject})
        rng = random.Random(f"{seed}:{fact.subject}:{fact.prompt}")
        corrupt = corrupted_prompt(tokenizer, fact.prompt, fact.subject, pool, rng)
        if corrupt is not None:
            rows.append((prompt_ids(tokenizer, fact.prompt), corrupt, target_ids(tokenizer, fact.object)[0]))
            kept.append(fact)
    return rows, kept


def batches(rows: list[tuple[list[int], list[int], int]], tokenizer, device: torch.device,
            chunk: int = CHUNK) -> list[PairBatch]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [PairBatch.from_rows(rows[i: i + chunk], pad, device) for i in range(0, len(rows), chunk)]


# --- attribution --------------------------------------------------------------------------------

def graph_of(arch) -> Graph:
    return Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)


def edge_scores(bundle, graph: Graph, batch: PairBatch, method: str = "eap") -> torch.Tensor:
    """Attribution (circuits.attribute: eap, eap-ig, eap-ig-activations, exact) summed over the batch's
    rows, [n_upstream, n_receivers] (0 where no edge); corrupted-input ablation, log-prob metric."""
    return attribute(bundle.bridge(), bundle.model, bundle.arch, graph, batch, method)


def relation_scores(bundle, graph: Graph, chunks: list[PairBatch], method: str = "eap") -> torch.Tensor:
    """Mean attribution per validation prompt, accumulated chunk by chunk."""
    total = None
    for batch in chunks:
        scores = edge_scores(bundle, graph, batch, method).float()
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
    """[B] bool: the answer's first token is among the k largest logits at the answer position."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.answer_pos].float()
    target = last[rows, batch.answer_ids]
    return (last > target[:, None]).sum(-1) < k


@dataclass
class Measured:
    """Per-row answer log-probs and Hit@10 of one way of running the model."""

    logprob: torch.Tensor
    hit: torch.Tensor

    def summary(self) -> dict[str, float]:
        return {"metric": float(self.logprob.mean()), "hit_at_10": float(self.hit.float().mean())}


class ScoringSet:
    """The test prompts in chunks, with their clean and corrupted runs cached for repeated patching."""

    def __init__(self, bundle, graph: Graph, chunks: list[PairBatch]):
        self.bundle, self.graph, self.chunks = bundle, graph, chunks
        self.corrupt_outputs: list[torch.Tensor] = []
        clean, corrupt = [], []
        bridge, model, arch = bundle.bridge(), bundle.model, bundle.arch
        with torch.no_grad():
            for batch in chunks:
                logits, _ = run_capture(bridge, graph, arch, model, batch.clean_ids, batch.attention_mask)
                clean.append((answer_logprob(logits, batch), hits(logits, batch)))
                logits, outputs = run_capture(bridge, graph, arch, model, batch.corrupt_ids, batch.attention_mask)
                corrupt.append((answer_logprob(logits, batch), hits(logits, batch)))
                self.corrupt_outputs.append(outputs)
        self.clean = Measured(*map(torch.cat, zip(*clean)))
        self.corrupted = Measured(*map(torch.cat, zip(*corrupt)))

    @property
    def n_prompts(self) -> int:
        return int(self.clean.logprob.shape[0])

    def with_edges(self, keep: torch.Tensor) -> Measured:
        """The model with only `keep`'s edges clean; every other edge carries its corrupted activation."""
        parts = []
        bridge, model, arch = self.bundle.bridge(), self.bundle.model, self.bundle.arch
        for batch, corrupt in zip(self.chunks, self.corrupt_outputs):
            logits = patched_logits(bridge, model, arch, self.graph, batch, keep.to(corrupt.device), corrupt)
            parts.append((answer_logprob(logits, batch), hits(logits, batch)))
        return Measured(*map(torch.cat, zip(*parts)))

    def faithfulness(self, measured: Measured) -> float:
        return normalized_faithfulness(float(measured.logprob.mean()), float(self.clean.logprob.mean()),
                                       float(self.corrupted.logprob.mean()))


def hit_table(test: ScoringSet, keep: torch.Tensor, random_draws: int, seed: int) -> tuple[dict[str, Any], Measured]:
    """The paper's Table 1 row: Hit@10 of the full model, the circuit and same-size random circuits."""
    n_edges = int(keep.sum())
    circuit = test.with_edges(keep)
    random_hits = [float(test.with_edges(random_edges(test.graph, n_edges, seed + i)).hit.float().mean())
                   for i in range(random_draws)]
    table = {"full_model": float(test.clean.hit.float().mean()), "circuit": float(circuit.hit.float().mean()),
             "random_circuit": sum(random_hits) / len(random_hits) if random_hits else None,
             "random_circuit_draws": random_hits, "corrupted_model": float(test.corrupted.hit.float().mean()),
             "n_edges": n_edges, "n_graph_edges": test.graph.n_edges, "k": HIT_K}
    return table, circuit


@dataclass
class RelationCircuitResult:
    circuit: Circuit
    keep: torch.Tensor
    scores: torch.Tensor
    test: ScoringSet
    report: dict[str, Any]
    test_facts: list[Fact]
    circuit_run: Measured  # the circuit's per-test-prompt log-probs and hits


def prepare_split(bundle, name: str, facts: list[Fact], samples: Sequence[tuple[str, str]], *,
                  known_top_k: int | None = 1, validation_fraction: float = 0.5, seed: int = 0,
                  max_validation: int | None = 32, max_test: int | None = 64) -> RelationSplit:
    """Known facts, split by subject. Counts: total, known, split sizes."""
    known, ranks = known_facts(bundle, facts, known_top_k)
    validation, test = split_by_subject(known, validation_fraction, seed, max_validation, max_test)
    criterion = ("all facts (no filter)" if known_top_k is None else
                 "the object's first token is the model's top-1 next token" if known_top_k == 1 else
                 f"the object's first token is within the model's top {known_top_k} next tokens")
    counts = {"prompts_total": len(facts), "subjects_total": len({f.subject for f in facts}),
              "known_criterion": criterion, "prompts_known": len(known),
              "subjects_known": len({f.subject for f in known}),
              "full_model_hit_at_10_all_prompts": sum(r <= HIT_K for r in ranks) / len(ranks) if ranks else None,
              "validation_prompts_before_corruption": len(validation), "test_prompts_before_corruption": len(test)}
    return RelationSplit(name, validation, test, counts)


def build_relation_circuit(bundle, split: RelationSplit, samples: Sequence[tuple[str, str]], *,
                           method: str = "eap", top_n: int = RELATION_TOP_N, seed: int = 0, random_draws: int = 3,
                           curve: bool = True, progress: Callable[[str], None] = log.info) -> RelationCircuitResult:
    """Builds the circuit on the validation split and scores it on the test split (see module doc)."""
    tok, dev = bundle.tokenizer, bundle.device
    val_rows, val_facts = pair_rows(tok, split.validation, samples, seed)
    test_rows, test_facts = pair_rows(tok, split.test, samples, seed)
    if not val_rows or not test_rows:
        raise ValueError(f"relation '{split.name}': too few known facts with a corruption partner "
                         f"({len(val_rows)} validation, {len(test_rows)} test prompts); "
                         "try --known-top-k 10 or another relation")
    graph = graph_of(bundle.arch)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    progress(f"circuit: {method} attribution over {len(val_rows)} validation prompts ({graph.n_edges} edges)")
    scores = relation_scores(bundle, graph, batches(val_rows, tok, dev), method)
    circuit, keep = circuit_from_scores(scores, graph, top_n, method, f"relation:{split.name}",
                                        {"validation_prompts": len(val_rows), "test_prompts": len(test_rows),
                                         "scores": "mean attribution per validation prompt"})
    timings["attribution"] = time.perf_counter() - start

    start = time.perf_counter()
    progress(f"circuit: scoring {len(circuit.edges)} edges on {len(test_rows)} test prompts")
    test = ScoringSet(bundle, graph, batches(test_rows, tok, dev))
    table, circuit_run = hit_table(test, keep, random_draws, seed)
    faith = {"metric": "log p(answer's first token) at the last prompt position, mean over test prompts",
             "clean": float(test.clean.logprob.mean()), "corrupted": float(test.corrupted.logprob.mean()),
             "circuit": float(circuit_run.logprob.mean()), "faithfulness": test.faithfulness(circuit_run)}
    circuit.metrics = {"metric_clean": faith["clean"], "metric_corrupted": faith["corrupted"],
                       "metric_circuit": faith["circuit"], "faithfulness": faith["faithfulness"],
                       "hit_at_10_full": table["full_model"], "hit_at_10_circuit": table["circuit"]}
    timings["evaluation"] = time.perf_counter() - start
    report: dict[str, Any] = {
        "relation": split.name, "method": method, "top_n": top_n, "seed": seed,
        "facts": dict(split.counts, validation_prompts=len(val_rows), test_prompts=len(test_rows),
                      validation_subjects=len({f.subject for f in val_facts}),
                      test_subjects=len({f.subject for f in test_facts})),
        "circuit": {"n_edges": len(circuit.edges), "n_nodes": len(circuit.nodes), "n_graph_edges": graph.n_edges,
                    "scores": "mean attribution per validation prompt"},
        "faithfulness": faith,
        "hit_at_10": table,
    }
    if curve:
        start = time.perf_counter()
        progress("circuit: faithfulness curve (10 sizes)")
        report["faithfulness_curve"] = faithfulness_curve(
            lambda k: test.faithfulness(test.with_edges(top_edges(scores, graph, k))),
            graph.n_edges)
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
    the rediscovered circuit with its overlap and Hit@10 change. The edited case's own subject is left
    out of the Hit@10 means (its answer is meant to change); it may still be among the validation
    prompts that build the circuit. The pre-edit circuit is measured before the first edited case of
    its relation (in sequential mode: after the edits made before that case)."""

    def __init__(self, bundle, top_n: int, seed: int, known_top_k: int | None, lre_root=None,
                 max_validation: int = 32, max_test: int = 32):
        self.bundle, self.top_n, self.seed, self.known_top_k = bundle, top_n, seed, known_top_k
        self.lre_root, self.max_validation, self.max_test = lre_root, max_validation, max_test
        self.sources: dict[str, RelationSource | None] = {}
        self.splits: dict[str, RelationSplit | str] = {}
        self.pre: dict[str, RelationState | str] = {}

    def _source(self, relation: str) -> RelationSource | None:
        if relation not in self.sources:
            self.sources[relation] = relation_source(relation, self.lre_root)
        return self.sources[relation]

    def _measure(self, relation: str) -> RelationState | str:
        """The relation circuit on the current weights, or why there is none."""
        source = self._source(relation)
        if source is None:
            return f"relation '{relation}' has no LRE file and fewer than {MIN_RELATION_FACTS} built-in facts"
        if relation not in self.splits:
            self.splits[relation] = prepare_split(self.bundle, source.name, source.facts, source.samples,
                                                  known_top_k=self.known_top_k, seed=self.seed,
                                                  max_validation=self.max_validation, max_test=self.max_test)
        try:
            result = build_relation_circuit(self.bundle, self.splits[relation], source.samples, top_n=self.top_n,
                                            seed=self.seed, random_draws=0, curve=False, progress=log.debug)
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
        post = self._measure(relation)
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


def relation_circuits_for(bundle, cfg) -> RelationCircuits:
    """The run's RelationCircuits, one per RunConfig object (the config is kept alive with it, so its
    id identifies the run). Relation circuits have RELATION_TOP_N edges (the run's --top-n sizes the
    per-case circuits); facts are filtered to known ones (top-1) unless the run keeps all cases."""
    key = id(cfg)
    if key not in _RUN_CACHES or _RUN_CACHES[key][0] is not cfg:
        known = 1 if getattr(cfg, "only_known", True) else None
        _RUN_CACHES[key] = (cfg, RelationCircuits(bundle, RELATION_TOP_N, cfg.seed, known))
    return _RUN_CACHES[key][1]
