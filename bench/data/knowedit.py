"""KnowEdit (Zhang et al. 2024): `subject, prompt, target_new, ground_truth` with portability and locality."""

from __future__ import annotations

import os
from typing import Any

from bench.data.records import CaseOrRejection, LoadedDataset, Record, load_records, record_id, subject_template
from lmview.case import EditCase


def _first_answer(rec: Record, value: Any, field_name: str) -> str:
    """An answer given as a string, a list of alternatives, or a list of alias lists: the first one."""
    while isinstance(value, list):
        if not value:
            raise rec.error(f"field '{field_name}' is an empty list")
        value, field_name = value[0], f"{field_name}[0]"
    if not isinstance(value, str):
        raise rec.error(f"field '{field_name}' has type {type(value).__name__}, expected str or list")
    return value.strip()


def _knowedit_groups(rec: Record, key: str) -> tuple[tuple[str, str], ...]:
    """All (prompt, answer) pairs of a ``{group: [{prompt, ground_truth}]}`` field, groups in file order."""
    if key not in rec.raw:
        return ()
    pairs: list[tuple[str, str]] = []
    for group, items in rec.get(key, dict).items():
        if not isinstance(items, list):
            raise rec.error(f"field '{key}.{group}' has type {type(items).__name__}, expected list")
        for i, item in enumerate(items):
            where = f"{key}.{group}[{i}]"
            if not isinstance(item, dict):
                raise rec.error(f"field '{where}' has type {type(item).__name__}, expected object")
            prompt = rec.get("prompt", (str, list), item, f"{where}.")
            truth = rec.get("ground_truth", (str, list), item, f"{where}.")
            if isinstance(prompt, str):
                pairs.append((prompt, _first_answer(rec, truth, f"{where}.ground_truth")))
                continue
            answers = truth if isinstance(truth, list) and len(truth) == len(prompt) else [truth] * len(prompt)
            for j, (text, answer) in enumerate(zip(prompt, answers)):
                if not isinstance(text, str):
                    raise rec.error(f"field '{where}.prompt[{j}]' has type {type(text).__name__}, expected str")
                pairs.append((text, _first_answer(rec, answer, f"{where}.ground_truth[{j}]")))
    return tuple(pairs)


def _knowedit_case(rec: Record) -> CaseOrRejection:
    case_id = record_id(rec, "case_id", "id")
    subject = rec.get("subject", str)
    prompt = rec.get("prompt", str)
    target_new = _first_answer(rec, rec.get("target_new", (str, list)), "target_new")
    if "ground_truth" not in rec.raw or rec.raw["ground_truth"] is None:
        return case_id, "no ground_truth (a knowledge-insertion record): the CounterFact scores need a true answer"
    rephrase_key = "rephrase_prompt" if "rephrase_prompt" in rec.raw else "rephrase"
    return EditCase(
        case_id=case_id,
        relation=str(rec.raw.get("relation", "knowedit")),
        subject=subject,
        prompt=subject_template(prompt, subject),
        target_true=_first_answer(rec, rec.get("ground_truth", (str, list)), "ground_truth"),
        target_new=target_new,
        paraphrases=tuple(rec.str_list(rephrase_key, required=False)),
        neighborhood=_knowedit_groups(rec, "locality"),
        portability=_knowedit_groups(rec, "portability"),
        scoring="zsre",
    )


def load_knowedit(path: str | os.PathLike[str]) -> LoadedDataset:
    """KnowEdit records; the locality groups are the neighbourhood, all portability groups are kept."""
    return load_records(path, lambda p, records: _knowedit_case)
