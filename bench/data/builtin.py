"""The built-in fact format (`datasets/facts.json` and files like it) and the facts' dev/test split."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bench.data.records import (LoadedDataset, Record, case_id_of, check_unique, keep_or_reject, parse_records,
                                prompt_answer_pairs, read_bytes)
from lmview.case import DatasetError, EditCase
from lmview.paths import DATASETS_DIR

FACTS_PATH = DATASETS_DIR / "facts.json"


def _builtin_case(rec: Record) -> EditCase:
    scoring = rec.get("scoring", str) if "scoring" in rec.raw else "counterfact"
    return EditCase(
        case_id=case_id_of(rec),
        relation=rec.get("relation", str),
        subject=rec.get("subject", str),
        prompt=rec.get("prompt", str),
        target_true=rec.get("target_true", str).strip(),
        target_new=rec.get("target_new", str).strip(),
        paraphrases=tuple(rec.str_list("paraphrases")),
        neighborhood=prompt_answer_pairs(rec, "neighborhood"),
        portability=prompt_answer_pairs(rec, "portability", required=False),
        generation_prompts=tuple(rec.str_list("generation_prompts", required=False)),
        attribute_prompts=tuple(rec.str_list("attribute_prompts", required=False)),
        reference_texts=tuple(rec.str_list("reference_texts", required=False)),
        locality=prompt_answer_pairs(rec, "locality", required=False),
        scoring=scoring,
    )


def load_builtin(path: str | os.PathLike[str]) -> LoadedDataset:
    """Load a file in the built-in facts format."""
    p = Path(path)
    data = read_bytes(p)
    records, header = parse_records(p, data)
    cases: list[EditCase] = []
    rejected: list[tuple[str, str]] = []
    for index, raw in enumerate(records):
        keep_or_reject(_builtin_case(Record(str(p), index, raw)), cases, rejected)
    check_unique(str(p), cases)
    name = header.get("name") if isinstance(header.get("name"), str) else p.stem
    return LoadedDataset(name, str(p), hashlib.sha256(data).hexdigest(), cases, rejected)


# The built-in facts are split once, by a fixed rule: within each relation, in file order, every
# DEV_EVERY-th case (positions 3, 7, 11, ...) is the dev split, the rest the test split. `bench tune`
# searches hyperparameters on dev; `facts` (what `bench run` and the leaderboard report) is test only.
DEV_EVERY = 4
FACTS_SPLITS = ("test", "dev", "all")
SPLIT_RULE = f"per relation in file order, positions {DEV_EVERY - 1}, {2 * DEV_EVERY - 1}, ... are dev; the rest test"


def facts_split_of(cases: list[EditCase]) -> dict[str, str]:
    """case_id -> 'dev' or 'test', by SPLIT_RULE."""
    position: dict[str, int] = {}
    out = {}
    for case in cases:
        index = position[case.relation] = position.get(case.relation, -1) + 1
        out[case.case_id] = "dev" if index % DEV_EVERY == DEV_EVERY - 1 else "test"
    return out


def load_facts(split: str = "test") -> LoadedDataset:
    if not FACTS_PATH.is_file():
        raise DatasetError(f"dataset 'facts': file not found at {FACTS_PATH}; "
                           f"it ships with the repository under datasets/facts.json")
    loaded = load_builtin(FACTS_PATH)
    of = facts_split_of(loaded.cases)
    kept = [c for c in loaded.cases if split == "all" or of[c.case_id] == split]
    loaded.split = {"name": split, "rule": SPLIT_RULE, "n_cases": len(kept),
                    "n_excluded": len(loaded.cases) - len(kept)}
    loaded.cases = kept
    loaded.name = "facts" if split == "test" else f"facts:{split}"
    return loaded
