"""`lre:<relation>`: edit cases from an LRE relation (Hernandez et al.; the Knowledge Circuits paper's data)."""

from __future__ import annotations

import random
from typing import Any

from bench.data.records import LoadedDataset, keep_or_reject
from bench.lre import load_relation
from lmview.case import EditCase


LRE_NEIGHBOURS = 5


def lre_cases(relation: Any, seed: int = 0, n_neighbors: int = LRE_NEIGHBOURS
              ) -> tuple[list[EditCase], list[tuple[str, str]]]:
    """Edit cases from a ``bench.lre.Relation``: one per distinct subject, in file order."""
    objects_of: dict[str, list[str]] = {}
    for subject, obj in relation.samples:
        objects_of.setdefault(subject, []).append(obj)
    all_objects = sorted({obj for _, obj in relation.samples})
    main = relation.prompt_templates[0]
    paraphrase_templates = [t for t in dict.fromkeys((*relation.prompt_templates[1:], *relation.prompt_templates_zs))
                            if t != main]
    subjects = list(objects_of)
    cases, rejected = [], []
    for index, subject in enumerate(subjects):
        case_id = f"{relation.name}-{index}"
        known = {o.lower() for o in objects_of[subject]}
        choices = [o for o in all_objects if o.lower() not in known]
        if not choices:
            rejected.append((case_id, "the relation has no other object to use as the new target"))
            continue
        rng = random.Random(f"{seed}:{relation.name}:{subject}")
        target_new = rng.choice(choices)
        others = [s for s in subjects if s != subject and subject not in s
                  and target_new.lower() not in {o.lower() for o in objects_of[s]}]
        picked = rng.sample(others, min(n_neighbors, len(others)))
        cases.append(EditCase(
            case_id=case_id, relation=relation.name, subject=subject, prompt=main,
            target_true=objects_of[subject][0], target_new=target_new,
            paraphrases=tuple(t.replace("{}", subject) for t in paraphrase_templates),
            neighborhood=tuple((main.replace("{}", s), objects_of[s][0]) for s in picked),
        ))
    return cases, rejected


def load_lre(name_or_path: str, seed: int = 0) -> LoadedDataset:
    """``lre:<relation>``: edit cases from an LRE relation file (see bench.lre)."""
    relation = load_relation(name_or_path)
    built, rejected = lre_cases(relation, seed)
    cases: list[EditCase] = []
    for case in built:
        keep_or_reject(case, cases, rejected)
    return LoadedDataset(f"lre:{relation.name}", relation.path, relation.sha256, cases, rejected)
