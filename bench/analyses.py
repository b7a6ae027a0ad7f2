"""Shared pieces of the Knowledge Circuits analyses (`bench heads`, `bench reuse`, `bench hallucination`,
`bench incontext`, `bench multihop`): relations from a folder in the LRE/KC layout, their facts in KC's
order, and the report folder."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.lre import LRE_ROOT, Relation, load_relation
from bench.relation_circuits import KC_SHUFFLE_SEED, Fact, answer_ranks, kc_template, relation_facts
import lmview.io
from lmview.case import DatasetError

OUTPUT_ROOT = Path("analyses-out")


def relation_files(root: Path) -> dict[str, Path]:
    """Every relation file under a folder in the LRE/KC layout (<root>/<kind>/<name>.json, or
    <root>/<name>.json), by name; a later duplicate name is kept as <kind>/<name>."""
    found: dict[str, Path] = {}
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*/*.json")):
        name = path.stem if path.stem not in found else f"{path.parent.name}/{path.stem}"
        found[name] = path
    return found


def relation_kind(path: Path, root: Path) -> str:
    """The knowledge type: the sub-folder (factual, commonsense, linguistic, bias), or the root's name."""
    return path.parent.name if path.parent != root else root.name


def pick_relations(spec: str | None, root: Path = LRE_ROOT) -> list[tuple[str, Path]]:
    """--relations: comma-separated names or paths, or 'all' / None for every file under root."""
    files = relation_files(root)
    if spec in (None, "", "all"):
        if not files:
            raise DatasetError(f"no relation files under {root}")
        return sorted(files.items())
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in files:
            chosen.append((item, files[item]))
        elif Path(item).suffix == ".json":
            if not Path(item).exists():
                raise DatasetError(f"relation file '{item}' does not exist")
            chosen.append((Path(item).stem, Path(item)))
        else:
            known = ", ".join(sorted(files)[:30])
            raise DatasetError(f"unknown relation '{item}' under {root}; known: {known}")
    return chosen


def kc_facts(relation: Relation) -> list[Fact]:
    """One prompt per sample with KC's template, in KC's order (random.seed(0); random.shuffle)."""
    facts = relation_facts(relation, [kc_template(relation)])
    random.Random(KC_SHUFFLE_SEED).shuffle(facts)
    return facts


def ranked_facts(bundle, relation: Relation, limit: int | None = None) -> list[tuple[Fact, int]]:
    """KC-ordered facts with the rank (1 = top) of the object's first token under the model."""
    facts = kc_facts(relation)
    facts = facts[: limit] if limit else facts
    return list(zip(facts, answer_ranks(bundle.model, bundle.tokenizer, facts, bundle.device))) if facts else []


def load(path: Path) -> Relation:
    return load_relation(str(path))


def command_line() -> str:
    return " ".join(["python -m bench", *sys.argv[1:]])


def provenance_fields(bundle: Any, started: float, **fields: Any) -> dict[str, Any]:
    """A report's closing fields: the command line, the model's provenance, `fields`, then the wall seconds
    since `started` (a time.perf_counter() reading)."""
    return {"command": command_line(), "model": bundle.provenance, **fields,
            "seconds": round(time.perf_counter() - started, 1)}


def write_json(folder: Path, name: str, data: dict[str, Any]) -> Path:
    return lmview.io.write_json(folder / name, data, default=str)


def output_folder(args: Any, command: str) -> Path:
    model = str(args.model).rstrip("/").split("/")[-1]
    return Path(args.output) if args.output else OUTPUT_ROOT / f"{command}-{model}"


# --- one prompt's circuit --------------------------------------------------------------------------

def corrupting_prompt(tokenizer, prompt: str, subject: str, samples, forbidden: set[int], seed: int = 0
                      ) -> tuple[list[int], int] | None:
    """The prompt with another subject of the relation (last occurrence swapped, same token length) none of
    whose objects starts with a token in `forbidden`; with that subject's answer token. None if no
    subject fits."""
    from lmview.tokens import prompt_ids, target_ids

    firsts: dict[str, set[int]] = {}
    for s, o in samples:
        firsts.setdefault(s, set()).add(target_ids(tokenizer, o)[0])
    candidates = sorted(s for s, ids in firsts.items() if s != subject and not ids & forbidden and subject not in s)
    random.Random(f"{seed}:{subject}:{prompt}").shuffle(candidates)
    head, _, tail = prompt.rpartition(subject)
    length = len(prompt_ids(tokenizer, prompt))
    for other in candidates:
        swapped = prompt_ids(tokenizer, head + other + tail)
        if len(swapped) == length:
            return swapped, min(firsts[other])
    return None


def prompt_circuit(bundle, clean: list[int], corrupt: list[int], answer_id: int, label: str, top_n: int,
                   ablate_from: int = 0):
    """The EAP circuit (corrupted patching, log-prob of `answer_id`, top_n edges) of one prompt pair."""
    from circuits.activations import PairBatch
    from circuits.circuit import discover

    pad = bundle.tokenizer.pad_token_id if bundle.tokenizer.pad_token_id is not None else 0
    batch = PairBatch.from_rows([(clean, corrupt, answer_id)], pad, bundle.device,
                                ablate_from=[ablate_from] if ablate_from else None)
    return discover(bundle.bridge(), bundle.model, bundle.arch, batch, label, top_n=top_n, evaluate=False)


def node_difference(a, b) -> dict[str, Any]:
    """Jaccards of two circuits and the nodes only in each (heads and MLPs)."""
    from circuits.circuit import overlap

    only_a = sorted(set(a.nodes) - set(b.nodes))
    only_b = sorted(set(b.nodes) - set(a.nodes))
    return dict(overlap(a, b), only_first=only_a, only_second=only_b)


@torch.no_grad()
def next_tokens(bundle, prompts: list[str], chunk: int = 16) -> list[int]:
    """The model's top-1 next token after each prompt."""
    from lmview.tokens import prompt_ids

    tok = bundle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[int] = []
    for start in range(0, len(prompts), chunk):
        rows = [prompt_ids(tok, p) for p in prompts[start: start + chunk]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = bundle.model(input_ids=ids.to(bundle.device), attention_mask=mask.to(bundle.device)).logits
        last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
        out += last.argmax(-1).tolist()
    return out
