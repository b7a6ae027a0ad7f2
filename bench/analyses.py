"""Shared pieces of the Knowledge Circuits analyses (`bench heads`, `bench reuse`, `bench hallucination`,
`bench incontext`, `bench multihop`): relations from a folder in the LRE/KC layout, their facts in KC's
order, and the report folder."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from bench.data import DatasetError
from bench.lre import LRE_ROOT, Relation, load_relation
from bench.relation_circuits import KC_SHUFFLE_SEED, Fact, answer_ranks, kc_template, relation_facts

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


def write_json(folder: Path, name: str, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def output_folder(args: Any, command: str) -> Path:
    model = str(args.model).rstrip("/").split("/")[-1]
    return Path(args.output) if args.output else OUTPUT_ROOT / f"{command}-{model}"
