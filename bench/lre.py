"""Relation files in the LRE format (Hernandez et al., "Linearity of Relation Decoding"), as used by the
Knowledge Circuits paper: `{name, prompt_templates[], prompt_templates_zs[], properties{}, samples[{subject,
object}]}`, templates holding `{}` for the subject."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmview.case import DatasetError
from lmview.paths import SHARED_DATA

LRE_ROOT = SHARED_DATA / "lre"


@dataclass(frozen=True)
class Relation:
    name: str  # file stem, e.g. country_capital_city
    title: str  # the file's "name" field
    prompt_templates: tuple[str, ...]
    prompt_templates_zs: tuple[str, ...]
    samples: tuple[tuple[str, str], ...]  # (subject, object)
    properties: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""


def unescape_unicode(text: str) -> str:
    """Literal "\\u00e1" escapes left in some LRE strings (e.g. "Bogot\\u00e1") become the character."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def relation_names(root: Path = LRE_ROOT) -> list[str]:
    return sorted(p.stem for p in root.glob("*/*.json"))


def resolve_relation(name_or_path: str, root: Path = LRE_ROOT) -> Path:
    """A path to a relation file, or a relation name looked up under ../shared/data/lre/<kind>/<name>.json."""
    path = Path(name_or_path)
    if path.suffix == ".json" or "/" in name_or_path:
        if not path.exists():
            raise DatasetError(f"relation file '{name_or_path}' does not exist")
        return path
    matches = sorted(root.glob(f"*/{name_or_path}.json"))
    if not matches:
        known = relation_names(root)
        hint = f"; known: {', '.join(known[:30])}" if known else f" (no relation files under {root})"
        raise DatasetError(f"unknown relation '{name_or_path}'{hint}")
    return matches[0]


def load_relation(name_or_path: str, root: Path = LRE_ROOT) -> Relation:
    path = resolve_relation(name_or_path, root)
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON: {exc}")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object with 'prompt_templates' and 'samples'")
    templates = data.get("prompt_templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise DatasetError(f"{path}: 'prompt_templates' must be a non-empty list of strings containing '{{}}'")
    samples = data.get("samples")
    if not isinstance(samples, list):
        raise DatasetError(f"{path}: 'samples' must be a list")
    pairs = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or not isinstance(sample.get("subject"), str) \
                or not isinstance(sample.get("object"), str):
            raise DatasetError(f"{path}: sample {i}: needs string fields 'subject' and 'object'")
        if sample["subject"].strip() and sample["object"].strip():
            pairs.append((unescape_unicode(sample["subject"].strip()), unescape_unicode(sample["object"].strip())))
    zero_shot = [t for t in data.get("prompt_templates_zs", []) if isinstance(t, str) and "{}" in t]
    return Relation(name=path.stem, title=str(data.get("name", path.stem)), prompt_templates=tuple(templates),
                    prompt_templates_zs=tuple(zero_shot), samples=tuple(pairs),
                    properties=dict(data.get("properties") or {}), path=str(path),
                    sha256=hashlib.sha256(raw).hexdigest())
