"""What every format shares: the loaded dataset, field access with one-line errors, reading files,
and the record loop."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmview.case import DatasetError, EditCase, validate_case


@dataclass
class LoadedDataset:
    name: str
    path: str
    sha256: str  # of the file bytes
    cases: list[EditCase]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (case_id, reason)
    split: dict[str, Any] | None = None  # which split of the file the cases are (the built-in facts only)


class Record:
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


def case_id_of(rec: Record) -> str:
    value = rec.get("case_id", (str, int))
    return str(value)


def keep_or_reject(case: EditCase, cases: list[EditCase], rejected: list[tuple[str, str]]) -> None:
    reason = validate_case(case)
    if reason is None:
        cases.append(case)
    else:
        rejected.append((case.case_id, reason))


def check_unique(path: str, cases: list[EditCase]) -> None:
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            raise DatasetError(f"{path}: duplicate case_id {case.case_id!r}")
        seen.add(case.case_id)


# --------------------------------------------------------------------------
# file reading


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def parse_records(path: Path, data: bytes) -> tuple[list[Any], dict[str, Any]]:
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


def prompt_answer_pairs(rec: Record, key: str, required: bool = True) -> tuple[tuple[str, str], ...]:
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


CaseOrRejection = EditCase | tuple[str, str]  # a case, or (case_id, reason) for a well-formed unusable one


Builder = Callable[[Record], CaseOrRejection]


def load_records(path: str | os.PathLike[str], make_builder: Callable[[Path, list[Any]], Builder]) -> LoadedDataset:
    """Read a file of records and build one case per record (the builder may look at all records first)."""
    p = Path(path)
    data = read_bytes(p)
    records, _ = parse_records(p, data)
    build = make_builder(p, records)
    cases: list[EditCase] = []
    rejected: list[tuple[str, str]] = []
    for index, raw in enumerate(records):
        result = build(Record(str(p), index, raw))
        if isinstance(result, EditCase):
            keep_or_reject(result, cases, rejected)
        else:
            rejected.append(result)
    check_unique(str(p), cases)
    return LoadedDataset(p.stem, str(p), hashlib.sha256(data).hexdigest(), cases, rejected)


def record_id(rec: Record, *keys: str) -> str:
    """The first present id field, else the record's index."""
    for key in keys:
        if key in rec.raw:
            return str(rec.get(key, (str, int)))
    return str(rec.index)


def subject_template(prompt: str, subject: str) -> str:
    """The prompt with the subject's first occurrence as "{}" (no placeholder when it is absent)."""
    return prompt.replace(subject, "{}", 1) if subject else prompt
