"""Edit-case records and dataset loaders.

Two on-disk formats are understood:

* the built-in fact set (``datasets/facts.json``): an object with a ``cases``
  list, one record per fact, prompts stored as templates with ``{}``;
* CounterFact, either the flattened layout (full prompt plus ``subject``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_*`` fields) or the original
  nested layout (``requested_rewrite`` with ``paraphrase_prompts`` and
  ``neighborhood_prompts``). The layout is detected per record.

Structural problems (a record that is not an object, a missing or mistyped
field) raise :class:`DatasetError`. Cases that are well formed but unusable
(subject missing from the prompt, empty target, new == true) are collected in
``LoadedDataset.rejected`` so a run can report them and carry on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
FACTS_PATH = REPO_ROOT / "datasets" / "facts.json"
COUNTERFACT_ENV = "KEBENCH_COUNTERFACT"
COUNTERFACT_DEFAULT = REPO_ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"


class DatasetError(ValueError):
    """A dataset file or record that cannot be read; the message is one line."""


@dataclass(frozen=True)
class EditCase:
    case_id: str
    relation: str
    subject: str
    prompt: str  # template with "{}" where the subject goes
    target_true: str  # no leading space
    target_new: str  # no leading space
    paraphrases: tuple[str, ...]  # full prompts
    neighborhood: tuple[tuple[str, str], ...]  # (full prompt, true answer)

    @property
    def rewrite_prompt(self) -> str:
        # str.replace rather than str.format: braces inside subjects stay literal
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "relation": self.relation,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_true": self.target_true,
            "target_new": self.target_new,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [{"prompt": p, "answer": a} for p, a in self.neighborhood],
        }


@dataclass
class LoadedDataset:
    name: str
    path: str
    sha256: str  # of the file bytes
    cases: list[EditCase]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (case_id, reason)


def validate_case(case: EditCase) -> str | None:
    """Return why ``case`` is unusable, or None when it is fine."""
    if not case.subject.strip():
        return "subject is empty"
    if "{}" not in case.prompt:
        return (f"subject {case.subject!r} not found in prompt {case.prompt!r} "
                f"(template has no '{{}}' placeholder)")
    if not case.target_true.strip():
        return "target_true is empty"
    if not case.target_new.strip():
        return "target_new is empty"
    if case.target_new.strip().lower() == case.target_true.strip().lower():
        return f"target_new equals target_true ({case.target_true.strip()!r})"
    return None


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


def _builtin_case(rec: _Record) -> EditCase:
    neighborhood = []
    for i, item in enumerate(rec.get("neighborhood", list)):
        if not isinstance(item, dict):
            raise rec.error(f"field 'neighborhood[{i}]' has type {type(item).__name__}, "
                            f"expected object")
        prefix = f"neighborhood[{i}]."
        neighborhood.append((rec.get("prompt", str, item, prefix),
                             rec.get("answer", str, item, prefix).lstrip()))
    return EditCase(
        case_id=_case_id(rec),
        relation=rec.get("relation", str),
        subject=rec.get("subject", str),
        prompt=rec.get("prompt", str),
        target_true=rec.get("target_true", str).lstrip(),
        target_new=rec.get("target_new", str).lstrip(),
        paraphrases=tuple(rec.str_list("paraphrases")),
        neighborhood=tuple(neighborhood),
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
        neighborhood=tuple((p, a.lstrip()) for p, a in zip(prompts, answers)),
    )


def _target_str(rec: _Record, rw: dict, key: str) -> str:
    """requested_rewrite.target_* is {"str": ...} in ROME files; accept a bare string too."""
    value = rec.get(key, (dict, str), rw, "requested_rewrite.")
    if isinstance(value, str):
        return value.lstrip()
    return rec.get("str", str, value, f"requested_rewrite.{key}.").lstrip()


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
    )


def load_counterfact(path: str | os.PathLike[str]) -> LoadedDataset:
    """Load CounterFact records; each record may use either layout."""
    p = Path(path)
    data = _read_bytes(p)
    records, _ = _parse_records(p, data)
    cases: list[EditCase] = []
    rejected: list[tuple[str, str]] = []
    for index, raw in enumerate(records):
        rec = _Record(str(p), index, raw)
        if "requested_rewrite" in raw:
            case = _nested_counterfact_case(rec)
        else:
            case = _flat_counterfact_case(rec)
        _finish(case, cases, rejected)
    _check_unique(str(p), cases)
    return LoadedDataset(p.stem, str(p), hashlib.sha256(data).hexdigest(), cases, rejected)


# --------------------------------------------------------------------------
# registry and dispatch


def _counterfact_path() -> Path:
    env = os.environ.get(COUNTERFACT_ENV)
    return Path(env) if env else COUNTERFACT_DEFAULT


def _load_registered(name: str, path: Path, loader: Callable[[Path], LoadedDataset],
                     hint: str) -> LoadedDataset:
    if not path.is_file():
        raise DatasetError(f"dataset '{name}': file not found at {path}; {hint}")
    loaded = loader(path)
    loaded.name = name
    return loaded


def _load_facts() -> LoadedDataset:
    return _load_registered("facts", FACTS_PATH, load_builtin,
                            "it ships with the repository under datasets/facts.json")


def _load_counterfact_default() -> LoadedDataset:
    hint = (f"put counterfact-val.json at {COUNTERFACT_DEFAULT} "
            f"or set {COUNTERFACT_ENV} to its path")
    return _load_registered("counterfact", _counterfact_path(), load_counterfact, hint)


DATASETS: dict[str, Callable[[], LoadedDataset]] = {
    "facts": _load_facts,
    "counterfact": _load_counterfact_default,
}
DEFAULT_DATASET = "facts"


def _looks_like_counterfact(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    return "requested_rewrite" in record or "ground_truth" in record


def load_dataset(name_or_path: str | os.PathLike[str]) -> LoadedDataset:
    """Load a registered dataset by name, or a .json/.jsonl file by path."""
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS[key]()
    p = Path(key)
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        records, _ = _parse_records(p, _read_bytes(p))
        if records and _looks_like_counterfact(records[0]):
            return load_counterfact(p)
        return load_builtin(p)
    if p.is_file():
        raise DatasetError(f"{p}: unsupported file type {p.suffix!r} (expected .json or .jsonl)")
    names = ", ".join(sorted(DATASETS))
    raise DatasetError(f"unknown dataset {key!r}; valid names: {names} "
                       f"(or pass a path to a .json/.jsonl file)")
