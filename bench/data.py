"""Edit-case records and dataset loaders.

Understood layouts (detected per file from its first record, so any file works as ``--dataset PATH``):

* the built-in fact set (``datasets/facts.json``): an object with a ``cases`` list, one record per
  fact, prompts stored as templates with ``{}``;
* CounterFact (Meng et al. 2022), either EasyEdit's flattened layout (full prompt plus ``subject``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_*``) or the original ROME layout
  (``requested_rewrite`` with ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``generation_prompts``, ``attribute_prompts``); the layout is detected per record;
* zsRE in the MEND layout (``src, alt, answers, rephrase, loc, loc_ans, subject``), scored with
  EasyEdit's top-1 token accuracy; ``loc`` keeps its ``nq question: `` prefix, as MEND and EasyEdit do;
* KnowEdit (Zhang et al. 2024): ``subject, prompt, target_new, ground_truth``, ``portability`` and
  ``locality`` groups of ``{prompt, ground_truth}``; an answer given as a list of aliases uses its first;
* MQuAKE-CF (Zhong et al. 2023): only cases with one requested rewrite and two-hop questions, so a
  single edit must change the multi-hop answer; the questions become portability prompts answered by
  ``new_answer``; the neighbourhood is single-hop cloze facts of other cases;
* ``lre:<relation>``: an LRE relation file (Hernandez et al., used by the Knowledge Circuits paper);
  the counterfactual target is another object of the relation chosen with a seed, the paraphrases
  are the relation's other templates, and the neighbourhood is other subjects with their true objects.

Registered names with a public source (``counterfact``, ``zsre``, ``knowedit``, ``mquake``) are read
from ``$KEBENCH_<NAME>`` when set, else from the shared sample under ``../shared/data`` when present,
else from the cache (``lmview.cache.cache_dir()/datasets``), else downloaded once with a short timeout.
A download's sha256 is stored beside it on first use and checked on every later load.

Structural problems (a record that is not an object, a missing or mistyped field) raise
:class:`DatasetError` naming the file, record index and field. Cases that are well formed but
unusable (subject missing from the prompt, empty target, new == true) are collected in
``LoadedDataset.rejected`` so a run can report them and carry on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmview.cache import publish, staging_path
from lmview.case import DatasetError, EditCase, validate_case
from lmview.paths import DATASETS_DIR, SHARED_DATA

FACTS_PATH = DATASETS_DIR / "facts.json"
COUNTERFACT_ENV = "KEBENCH_COUNTERFACT"
COUNTERFACT_DEFAULT = SHARED_DATA / "counterfact" / "counterfact-val.json"


@dataclass
class LoadedDataset:
    name: str
    path: str
    sha256: str  # of the file bytes
    cases: list[EditCase]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (case_id, reason)
    split: dict[str, Any] | None = None  # which split of the file the cases are (the built-in facts only)


# --------------------------------------------------------------------------
# field access with one-line errors


class _Record:
    """A raw record plus where it came from, for error messages."""

    def __init__(self, path: str, index: int, raw: Any):
        self.path, self.index, self.raw = path, index, raw
        if not isinstance(raw, dict):
            raise self.error(f"expected a JSON object, got {type(raw).__name__}")

    def where(self) -> str:
        cid = self.raw.get("case_id") if isinstance(self.raw, dict) else None
        tag = f" (case_id {str(cid)!r})" if cid is not None else ""
        return f"{self.path}: record {self.index}{tag}"

    def error(self, what: str) -> DatasetError:
        return DatasetError(f"{self.where()}: {what}")

    def get(self, key: str, kind: type | tuple[type, ...], obj: dict | None = None,
            prefix: str = "") -> Any:
        src = self.raw if obj is None else obj
        if key not in src:
            raise self.error(f"field '{prefix}{key}' is missing")
        value = src[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.error(f"field '{prefix}{key}' has type {type(value).__name__}, "
                             f"expected {_kind_name(kind)}")
        return value

    def str_list(self, key: str, obj: dict | None = None, prefix: str = "",
                 required: bool = True) -> list[str]:
        """A field that may be a string or a list of strings."""
        src = self.raw if obj is None else obj
        if key not in src and not required:
            return []
        value = self.get(key, (str, list), obj, prefix)
        items = [value] if isinstance(value, str) else value
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.error(f"field '{prefix}{key}[{i}]' has type {type(item).__name__}, "
                                 f"expected str")
        return items


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _case_id(rec: _Record) -> str:
    value = rec.get("case_id", (str, int))
    return str(value)


def _finish(case: EditCase, cases: list[EditCase], rejected: list[tuple[str, str]]) -> None:
    reason = validate_case(case)
    if reason is None:
        cases.append(case)
    else:
        rejected.append((case.case_id, reason))


def _check_unique(path: str, cases: list[EditCase]) -> None:
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            raise DatasetError(f"{path}: duplicate case_id {case.case_id!r}")
        seen.add(case.case_id)


# --------------------------------------------------------------------------
# file reading


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _parse_records(path: Path, data: bytes) -> tuple[list[Any], dict[str, Any]]:
    """Return (records, header). Header holds top-level keys of a facts-style object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if path.suffix == ".jsonl":
        return _parse_jsonl(path, text), {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(doc, list):
        return doc, {}
    if isinstance(doc, dict) and isinstance(doc.get("cases"), list):
        return doc["cases"], doc
    raise DatasetError(f"{path}: expected a JSON list of records or an object with a 'cases' list")


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON on line {lineno} ({exc.msg})") from None
    return records


# --------------------------------------------------------------------------
# built-in facts format


def _prompt_answer_pairs(rec: _Record, key: str, required: bool = True) -> tuple[tuple[str, str], ...]:
    """A list of {prompt, answer} objects."""
    if key not in rec.raw and not required:
        return ()
    pairs = []
    for i, item in enumerate(rec.get(key, list)):
        if not isinstance(item, dict):
            raise rec.error(f"field '{key}[{i}]' has type {type(item).__name__}, expected object")
        prefix = f"{key}[{i}]."
        pairs.append((rec.get("prompt", str, item, prefix), rec.get("answer", str, item, prefix).strip()))
    return tuple(pairs)


def _builtin_case(rec: _Record) -> EditCase:
    scoring = rec.get("scoring", str) if "scoring" in rec.raw else "counterfact"
    return EditCase(
        case_id=_case_id(rec),
        relation=rec.get("relation", str),
        subject=rec.get("subject", str),
        prompt=rec.get("prompt", str),
        target_true=rec.get("target_true", str).strip(),
        target_new=rec.get("target_new", str).strip(),
        paraphrases=tuple(rec.str_list("paraphrases")),
        neighborhood=_prompt_answer_pairs(rec, "neighborhood"),
        portability=_prompt_answer_pairs(rec, "portability", required=False),
        generation_prompts=tuple(rec.str_list("generation_prompts", required=False)),
        attribute_prompts=tuple(rec.str_list("attribute_prompts", required=False)),
        reference_texts=tuple(rec.str_list("reference_texts", required=False)),
        locality=_prompt_answer_pairs(rec, "locality", required=False),
        scoring=scoring,
    )


def load_builtin(path: str | os.PathLike[str]) -> LoadedDataset:
    """Load a file in the built-in facts format."""
    p = Path(path)
    data = _read_bytes(p)
    records, header = _parse_records(p, data)
    cases: list[EditCase] = []
    rejected: list[tuple[str, str]] = []
    for index, raw in enumerate(records):
        _finish(_builtin_case(_Record(str(p), index, raw)), cases, rejected)
    _check_unique(str(p), cases)
    name = header.get("name") if isinstance(header.get("name"), str) else p.stem
    return LoadedDataset(name, str(p), hashlib.sha256(data).hexdigest(), cases, rejected)


# --------------------------------------------------------------------------
# CounterFact (flattened EasyEdit-style and original nested layouts)


def _flat_counterfact_case(rec: _Record) -> EditCase:
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
        case_id=_case_id(rec),
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


def _target_str(rec: _Record, rw: dict, key: str, prefix: str = "requested_rewrite.") -> str:
    """requested_rewrite.target_* is {"str": ...} in ROME files; accept a bare string too."""
    value = rec.get(key, (dict, str), rw, prefix)
    if isinstance(value, str):
        return value.strip()
    return rec.get("str", str, value, f"{prefix}{key}.").strip()


def _nested_counterfact_case(rec: _Record) -> EditCase:
    rw = rec.get("requested_rewrite", dict)
    target_true = _target_str(rec, rw, "target_true")
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
        case_id=_case_id(rec),
        relation=str(relation),
        subject=rec.get("subject", str, rw, "requested_rewrite."),
        prompt=rec.get("prompt", str, rw, "requested_rewrite."),
        target_true=target_true,
        target_new=_target_str(rec, rw, "target_new"),
        paraphrases=tuple(rec.str_list("paraphrase_prompts", required=False)),
        neighborhood=tuple(neighborhood),
        generation_prompts=tuple(rec.str_list("generation_prompts", required=False)),
        attribute_prompts=tuple(rec.str_list("attribute_prompts", required=False)),
        reference_texts=tuple(rec.str_list("reference_texts", required=False)),
    )


def load_counterfact(path: str | os.PathLike[str]) -> LoadedDataset:
    """Load CounterFact records; each record may use either layout."""
    return _load_file(path, lambda p, records: _counterfact_case)


def _counterfact_case(rec: _Record) -> EditCase:
    return _nested_counterfact_case(rec) if "requested_rewrite" in rec.raw else _flat_counterfact_case(rec)


# --------------------------------------------------------------------------
# generic record loop


CaseOrRejection = EditCase | tuple[str, str]  # a case, or (case_id, reason) for a well-formed unusable one


Builder = Callable[[_Record], CaseOrRejection]


def _load_file(path: str | os.PathLike[str], make_builder: Callable[[Path, list[Any]], Builder]) -> LoadedDataset:
    """Read a file of records and build one case per record (the builder may look at all records first)."""
    p = Path(path)
    data = _read_bytes(p)
    records, _ = _parse_records(p, data)
    build = make_builder(p, records)
    cases: list[EditCase] = []
    rejected: list[tuple[str, str]] = []
    for index, raw in enumerate(records):
        result = build(_Record(str(p), index, raw))
        if isinstance(result, EditCase):
            _finish(result, cases, rejected)
        else:
            rejected.append(result)
    _check_unique(str(p), cases)
    return LoadedDataset(p.stem, str(p), hashlib.sha256(data).hexdigest(), cases, rejected)


def _record_id(rec: _Record, *keys: str) -> str:
    """The first present id field, else the record's index."""
    for key in keys:
        if key in rec.raw:
            return str(rec.get(key, (str, int)))
    return str(rec.index)


def _template(prompt: str, subject: str) -> str:
    """The prompt with the subject's first occurrence as "{}" (no placeholder when it is absent)."""
    return prompt.replace(subject, "{}", 1) if subject else prompt


# --------------------------------------------------------------------------
# zsRE (MEND layout)


def _zsre_case(rec: _Record) -> EditCase:
    subject = rec.get("subject", str)
    answers = rec.str_list("answers")
    if not answers:
        raise rec.error("field 'answers' is an empty list")
    return EditCase(
        case_id=_record_id(rec, "case_id"),
        relation=str(rec.raw.get("relation", "zsre")),
        subject=subject,
        prompt=_template(rec.get("src", str), subject),
        target_true=answers[0].strip(),
        target_new=rec.get("alt", str).strip(),
        paraphrases=tuple(rec.str_list("rephrase", required=False)),
        neighborhood=((rec.get("loc", str), rec.get("loc_ans", str).strip()),),
        scoring="zsre",
    )


def load_zsre(path: str | os.PathLike[str]) -> LoadedDataset:
    """zsRE question-answering edits in the MEND layout (ROME's zsre_mem_eval.json uses it too)."""
    return _load_file(path, lambda p, records: _zsre_case)


# --------------------------------------------------------------------------
# KnowEdit


def _first_answer(rec: _Record, value: Any, field_name: str) -> str:
    """An answer given as a string, a list of alternatives, or a list of alias lists: the first one."""
    while isinstance(value, list):
        if not value:
            raise rec.error(f"field '{field_name}' is an empty list")
        value, field_name = value[0], f"{field_name}[0]"
    if not isinstance(value, str):
        raise rec.error(f"field '{field_name}' has type {type(value).__name__}, expected str or list")
    return value.strip()


def _knowedit_groups(rec: _Record, key: str) -> tuple[tuple[str, str], ...]:
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


def _knowedit_case(rec: _Record) -> CaseOrRejection:
    case_id = _record_id(rec, "case_id", "id")
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
        prompt=_template(prompt, subject),
        target_true=_first_answer(rec, rec.get("ground_truth", (str, list)), "ground_truth"),
        target_new=target_new,
        paraphrases=tuple(rec.str_list(rephrase_key, required=False)),
        neighborhood=_knowedit_groups(rec, "locality"),
        portability=_knowedit_groups(rec, "portability"),
        scoring="zsre",
    )


def load_knowedit(path: str | os.PathLike[str]) -> LoadedDataset:
    """KnowEdit records; the locality groups are the neighbourhood, all portability groups are kept."""
    return _load_file(path, lambda p, records: _knowedit_case)


# --------------------------------------------------------------------------
# MQuAKE-CF


MQUAKE_NEIGHBOURS = 5


def _mquake_cloze_pool(path: Path, records: list[Any]) -> list[tuple[str, str, str]]:
    """(case_id, cloze prompt, answer) of every record's unedited single-hop facts."""
    pool = []
    for index, raw in enumerate(records):
        rec = _Record(str(path), index, raw)
        case_id = _record_id(rec, "case_id")
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


def _mquake_case(rec: _Record, pool: list[tuple[str, str, str]], seed: int) -> CaseOrRejection:
    case_id = _record_id(rec, "case_id")
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
    target_new = _target_str(rec, rw, "target_new", prefix)
    question = rw.get("question")
    return EditCase(
        case_id=case_id,
        relation=str(rw.get("relation_id", "mquake")),
        subject=subject,
        prompt=rec.get("prompt", str, rw, prefix),
        target_true=_target_str(rec, rw, "target_true", prefix),
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

    return _load_file(path, make_builder)


# --------------------------------------------------------------------------
# LRE relations


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
    from bench.lre import load_relation  # bench.lre imports this module

    relation = load_relation(name_or_path)
    built, rejected = lre_cases(relation, seed)
    cases: list[EditCase] = []
    for case in built:
        _finish(case, cases, rejected)
    return LoadedDataset(f"lre:{relation.name}", relation.path, relation.sha256, cases, rejected)


# --------------------------------------------------------------------------
# registered names: local file, shared sample, cache, or a verified download


OFFLINE_ENV = "KEBENCH_OFFLINE"  # set to 1 to never try a download
DOWNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DatasetSource:
    """Where a registered dataset comes from."""

    name: str
    env: str  # an environment variable naming a local file
    filename: str  # the file's name in the cache
    url: str  # its canonical public location
    loader: Callable[..., LoadedDataset]
    shared: Path | None = None  # the sample under ../shared/data, used when present
    sha256: str | None = None  # pinned hash; None: trust on first download and store it
    description: str = ""

    def cache_path(self) -> Path:
        from lmview.cache import cache_dir

        return cache_dir() / "datasets" / self.filename


SOURCES: dict[str, DatasetSource] = {
    "counterfact": DatasetSource(
        "counterfact", COUNTERFACT_ENV, "counterfact.json", "https://rome.baulab.info/data/dsets/counterfact.json",
        load_counterfact, COUNTERFACT_DEFAULT,
        description="CounterFact (Meng et al. 2022): shared flattened sample, else ROME's counterfact.json"),
    "zsre": DatasetSource(
        "zsre", "KEBENCH_ZSRE", "zsre_mem_eval.json", "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
        load_zsre, SHARED_DATA / "zsre" / "zsre_mend_train-1k.json",
        description="zsRE, MEND layout: shared 1k sample, else ROME's zsre_mem_eval.json; token-accuracy scoring"),
    "knowedit": DatasetSource(
        "knowedit", "KEBENCH_KNOWEDIT", "knowedit_wiki_counterfact_test_cf.json",
        "https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/benchmark/wiki_counterfact/test_cf.json",
        load_knowedit, description="KnowEdit WikiData_counterfact test split, with portability and locality"),
    "mquake": DatasetSource(
        "mquake", "KEBENCH_MQUAKE", "MQuAKE-CF-3k.json",
        "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k.json",
        load_mquake, description="MQuAKE-CF-3k: single-edit two-hop cases, multi-hop questions as portability"),
}


def _hash_file(path: Path) -> str:
    from lmview.cache import sha256_file

    return sha256_file(path)


def _verified_cache(source: DatasetSource) -> Path | None:
    """The cached download, after checking it against the pinned or the stored hash."""
    path = source.cache_path()
    if not path.is_file():
        return None
    stored = path.with_name(path.name + ".sha256")
    expected = source.sha256 or (stored.read_text().split()[0] if stored.is_file() else None)
    actual = _hash_file(path)
    if expected is None:
        stored.write_text(f"{actual}  {path.name}\n")  # placed by hand: trust it from now on
    elif actual != expected:
        raise DatasetError(f"dataset '{source.name}': {path} has sha256 {actual}, expected {expected}; "
                           f"delete it to download again")
    return path


def _download(source: DatasetSource) -> Path:
    """Fetches the file once, with a short timeout; stores its sha256 beside it."""
    import urllib.error
    import urllib.request

    path = source.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = staging_path(path)
    try:
        with urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(f"dataset '{source.name}' is not available offline and the download from "
                           f"{source.url} failed ({reason}); put {source.filename} at {path} or set "
                           f"{source.env} to its path") from None
    actual = _hash_file(part)
    if source.sha256 and actual != source.sha256:
        part.unlink()
        raise DatasetError(f"dataset '{source.name}': download from {source.url} has sha256 {actual}, "
                           f"expected {source.sha256}")
    publish(part, path)
    path.with_name(path.name + ".sha256").write_text(f"{actual}  {path.name}\n")
    return path


def resolve_source(source: DatasetSource) -> Path:
    """$ENV, else the shared sample, else the verified cache, else a download (unless offline)."""
    env = os.environ.get(source.env)
    if env:
        path = Path(env)
        if not path.is_file():
            raise DatasetError(f"dataset '{source.name}': file not found at {path} "
                               f"(from {source.env}); point {source.env} at the file or unset it")
        return path
    if source.shared is not None and source.shared.is_file():
        return source.shared
    cached = _verified_cache(source)
    if cached is not None:
        return cached
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DatasetError(f"dataset '{source.name}' is not available offline ({OFFLINE_ENV} is set); "
                           f"put {source.filename} at {source.cache_path()} or set {source.env} to its path")
    return _download(source)


def _load_source(name: str, seed: int) -> LoadedDataset:
    source = SOURCES[name]
    path = resolve_source(source)
    loaded = source.loader(path, seed=seed) if source.loader is load_mquake else source.loader(path)
    loaded.name = name
    return loaded


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


def _load_facts(split: str = "test") -> LoadedDataset:
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


DATASETS: dict[str, Callable[[], LoadedDataset]] = {
    "facts": _load_facts,
    "facts:dev": lambda: _load_facts("dev"),
    "facts:all": lambda: _load_facts("all"),
    **{name: (lambda name=name: _load_source(name, 0)) for name in SOURCES},
}
DEFAULT_DATASET = "facts"
LRE_PREFIX = "lre:"


def dataset_descriptions() -> dict[str, str]:
    """One line per registered name, for `python -m bench list datasets`."""
    out = {"facts": "the built-in fact set, datasets/facts.json: its test split (what the leaderboard reports)",
           "facts:dev": f"the built-in facts' dev split, for `bench tune` ({SPLIT_RULE})",
           "facts:all": "the built-in facts, both splits"}
    for name, source in SOURCES.items():
        env = os.environ.get(source.env)
        where = (f"${source.env}={env}" if env else str(source.shared) if source.shared and source.shared.is_file()
                 else f"{source.cache_path()} (downloaded from {source.url} on first use)")
        out[name] = f"{source.description}; read from {where}"
    out[f"{LRE_PREFIX}<relation>"] = "edit cases from an LRE relation under ../shared/data/lre, or an LRE file by path"
    return out


# --------------------------------------------------------------------------
# layout detection for files given by path


def detect_layout(first: Any) -> str:
    """Which loader reads a file whose first record (or top-level object) is ``first``."""
    if not isinstance(first, dict):
        return "builtin"
    if "samples" in first and "prompt_templates" in first:
        return "lre"
    if isinstance(first.get("requested_rewrite"), list):
        return "mquake"
    if "src" in first and "alt" in first:
        return "zsre"
    if isinstance(first.get("portability"), dict) or isinstance(first.get("locality"), dict):
        return "knowedit"
    if "requested_rewrite" in first or "ground_truth" in first:
        return "counterfact"
    return "builtin"


def _load_path(p: Path, seed: int) -> LoadedDataset:
    data = _read_bytes(p)
    if p.suffix == ".json":
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None  # the loader reports it with a line number
        if isinstance(doc, dict) and detect_layout(doc) == "lre":
            return load_lre(str(p), seed)
    records, _ = _parse_records(p, data)
    layout = detect_layout(records[0]) if records else "builtin"
    if layout == "mquake":
        return load_mquake(p, seed)
    loaders = {"zsre": load_zsre, "knowedit": load_knowedit, "counterfact": load_counterfact,
               "builtin": load_builtin}
    return loaders[layout](p)


def load_dataset(name_or_path: str | os.PathLike[str], seed: int = 0) -> LoadedDataset:
    """A registered dataset by name, ``lre:<relation>``, or a .json/.jsonl file by path (layout detected).

    ``seed`` picks the counterfactual targets of ``lre:`` cases and the MQuAKE neighbourhood.
    """
    key = str(name_or_path)
    if key in ("facts", "facts:test"):
        return _load_facts()
    if key.startswith("facts:") and key[len("facts:"):] in FACTS_SPLITS:
        return _load_facts(key[len("facts:"):])
    if key in SOURCES:
        return _load_source(key, seed)
    if key.startswith(LRE_PREFIX):
        return load_lre(key[len(LRE_PREFIX):], seed)
    p = Path(key)
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        return _load_path(p, seed)
    if p.is_file():
        raise DatasetError(f"{p}: unsupported file type {p.suffix!r} (expected .json or .jsonl)")
    names = ", ".join(sorted(DATASETS))
    raise DatasetError(f"unknown dataset {key!r}; valid names: {names}, {LRE_PREFIX}<relation> "
                       f"(or pass a path to a .json/.jsonl file)")
