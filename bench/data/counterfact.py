"""CounterFact (Meng et al. 2022): EasyEdit's flattened layout and the original nested ROME layout."""

from __future__ import annotations

import os

from bench.data.records import LoadedDataset, Record, case_id_of, load_records
from lmview.case import EditCase
from lmview.paths import SHARED_DATA

COUNTERFACT_ENV = "KEBENCH_COUNTERFACT"
COUNTERFACT_DEFAULT = SHARED_DATA / "counterfact" / "counterfact-val.json"


def _flat_counterfact_case(rec: Record) -> EditCase:
    subject = rec.get("subject", str)
    full_prompt = rec.get("prompt", str)
    # template: first occurrence of the subject becomes "{}"; if absent the
    # template has no placeholder and validate_case rejects the case
    template = full_prompt.replace(subject, "{}", 1) if subject else full_prompt
    prompts = rec.str_list("locality_prompt", required=False)
    answers = rec.str_list("locality_ground_truth", required=False)
    if len(prompts) != len(answers):
        raise rec.error(f"fields 'locality_prompt' and 'locality_ground_truth' differ in "
                        f"length ({len(prompts)} vs {len(answers)})")
    relation = rec.raw.get("relation_id", "counterfact")
    return EditCase(
        case_id=case_id_of(rec),
        relation=str(relation),
        subject=subject,
        prompt=template,
        target_true=rec.get("ground_truth", str).lstrip(),
        target_new=rec.get("target_new", str).lstrip(),
        paraphrases=tuple(rec.str_list("rephrase_prompt", required=False)),
        neighborhood=tuple((p, a.strip()) for p, a in zip(prompts, answers)),
        generation_prompts=tuple(rec.str_list("generation_prompts", required=False)),
        reference_texts=tuple(rec.str_list("reference_texts", required=False)),
    )


def target_text(rec: Record, rw: dict, key: str, prefix: str = "requested_rewrite.") -> str:
    """requested_rewrite.target_* is {"str": ...} in ROME files; accept a bare string too."""
    value = rec.get(key, (dict, str), rw, prefix)
    if isinstance(value, str):
        return value.strip()
    return rec.get("str", str, value, f"{prefix}{key}.").strip()


def _nested_counterfact_case(rec: Record) -> EditCase:
    rw = rec.get("requested_rewrite", dict)
    target_true = target_text(rec, rw, "target_true")
    neighborhood = []
    for i, item in enumerate(rec.raw.get("neighborhood_prompts", []) or []):
        if isinstance(item, str):
            neighborhood.append((item, target_true))
        elif isinstance(item, dict):
            prefix = f"neighborhood_prompts[{i}]."
            answer = rec.get("target", str, item, prefix) if "target" in item else target_true
            neighborhood.append((rec.get("prompt", str, item, prefix), answer.lstrip()))
        else:
            raise rec.error(f"field 'neighborhood_prompts[{i}]' has type "
                            f"{type(item).__name__}, expected str or object")
    relation = rw.get("relation_id", "counterfact")
    return EditCase(
        case_id=case_id_of(rec),
        relation=str(relation),
        subject=rec.get("subject", str, rw, "requested_rewrite."),
        prompt=rec.get("prompt", str, rw, "requested_rewrite."),
        target_true=target_true,
        target_new=target_text(rec, rw, "target_new"),
        paraphrases=tuple(rec.str_list("paraphrase_prompts", required=False)),
        neighborhood=tuple(neighborhood),
        generation_prompts=tuple(rec.str_list("generation_prompts", required=False)),
        attribute_prompts=tuple(rec.str_list("attribute_prompts", required=False)),
        reference_texts=tuple(rec.str_list("reference_texts", required=False)),
    )


def load_counterfact(path: str | os.PathLike[str]) -> LoadedDataset:
    """Load CounterFact records; each record may use either layout."""
    return load_records(path, lambda p, records: _counterfact_case)


def _counterfact_case(rec: Record) -> EditCase:
    return _nested_counterfact_case(rec) if "requested_rewrite" in rec.raw else _flat_counterfact_case(rec)
