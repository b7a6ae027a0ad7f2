"""MQuAKE-CF (Zhong et al. 2023): single-edit cases whose two-hop questions become portability prompts."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from bench.data.counterfact import target_text
from bench.data.records import Builder, CaseOrRejection, LoadedDataset, Record, load_records, record_id
from lmview.case import EditCase


MQUAKE_NEIGHBOURS = 5


def _mquake_cloze_pool(path: Path, records: list[Any]) -> list[tuple[str, str, str]]:
    """(case_id, cloze prompt, answer) of every record's unedited single-hop facts."""
    pool = []
    for index, raw in enumerate(records):
        rec = Record(str(path), index, raw)
        case_id = record_id(rec, "case_id")
        for i, hop in enumerate(rec.raw.get("single_hops", []) or []):
            where = f"single_hops[{i}]."
            if not isinstance(hop, dict):
                raise rec.error(f"field 'single_hops[{i}]' has type {type(hop).__name__}, expected object")
            pool.append((case_id, rec.get("cloze", str, hop, where), rec.get("answer", str, hop, where).strip()))
    return pool


def _mquake_neighbours(pool: list[tuple[str, str, str]], case_id: str, subject: str, target_new: str,
                       seed: int) -> tuple[tuple[str, str], ...]:
    """Single-hop facts of other cases that neither mention the subject nor answer target_new."""
    rng = random.Random(f"{seed}:mquake:{case_id}")
    chosen: dict[str, str] = {}
    for _ in range(50 * MQUAKE_NEIGHBOURS):
        if len(chosen) == MQUAKE_NEIGHBOURS or not pool:
            break
        other_id, cloze, answer = pool[rng.randrange(len(pool))]
        if other_id != case_id and subject not in cloze and answer.lower() != target_new.lower() and answer:
            chosen.setdefault(cloze, answer)
    return tuple(chosen.items())


def _mquake_case(rec: Record, pool: list[tuple[str, str, str]], seed: int) -> CaseOrRejection:
    case_id = record_id(rec, "case_id")
    rewrites = rec.get("requested_rewrite", list)
    questions = rec.str_list("questions")
    new_answer, answer = rec.get("new_answer", str).strip(), rec.get("answer", str).strip()
    hops = len(rec.get("single_hops", list))
    if len(rewrites) != 1:
        return case_id, f"{len(rewrites)} requested rewrites; only single-edit cases are used"
    if hops != 2:
        return case_id, f"{hops}-hop questions; only two-hop cases are used"
    if new_answer.lower() == answer.lower():
        return case_id, "the edit does not change the two-hop answer"
    rw = rewrites[0]
    if not isinstance(rw, dict):
        raise rec.error(f"field 'requested_rewrite[0]' has type {type(rw).__name__}, expected object")
    prefix = "requested_rewrite[0]."
    subject = rec.get("subject", str, rw, prefix)
    target_new = target_text(rec, rw, "target_new", prefix)
    question = rw.get("question")
    return EditCase(
        case_id=case_id,
        relation=str(rw.get("relation_id", "mquake")),
        subject=subject,
        prompt=rec.get("prompt", str, rw, prefix),
        target_true=target_text(rec, rw, "target_true", prefix),
        target_new=target_new,
        paraphrases=(question,) if isinstance(question, str) and question.strip() else (),
        neighborhood=_mquake_neighbours(pool, case_id, subject, target_new, seed),
        portability=tuple((q, new_answer) for q in questions),
    )


def load_mquake(path: str | os.PathLike[str], seed: int = 0) -> LoadedDataset:
    """MQuAKE-CF: single-edit two-hop cases; the multi-hop questions are portability prompts."""
    def make_builder(p: Path, records: list[Any]) -> Builder:
        pool = _mquake_cloze_pool(p, records)
        return lambda rec: _mquake_case(rec, pool, seed)

    return load_records(path, make_builder)
