"""zsRE in the MEND layout (`src, alt, answers, rephrase, loc, loc_ans, subject`)."""

from __future__ import annotations

import os

from bench.data.records import LoadedDataset, Record, load_records, record_id, subject_template
from lmview.case import EditCase


def _zsre_case(rec: Record) -> EditCase:
    subject = rec.get("subject", str)
    answers = rec.str_list("answers")
    if not answers:
        raise rec.error("field 'answers' is an empty list")
    return EditCase(
        case_id=record_id(rec, "case_id"),
        relation=str(rec.raw.get("relation", "zsre")),
        subject=subject,
        prompt=subject_template(rec.get("src", str), subject),
        target_true=answers[0].strip(),
        target_new=rec.get("alt", str).strip(),
        paraphrases=tuple(rec.str_list("rephrase", required=False)),
        neighborhood=((rec.get("loc", str), rec.get("loc_ans", str).strip()),),
        scoring="zsre",
    )


def load_zsre(path: str | os.PathLike[str]) -> LoadedDataset:
    """zsRE question-answering edits in the MEND layout (ROME's zsre_mem_eval.json uses it too)."""
    return load_records(path, lambda p, records: _zsre_case)
