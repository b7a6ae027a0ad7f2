"""Small file helpers shared by the harness and the libraries."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any],
                 default: Callable[[Any], Any] | None = None) -> None:
    """Append one JSON line and fsync it, so a crash never loses a finished row."""
    with open(Path(path), "a") as handle:
        handle.write(json.dumps(row, default=default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | os.PathLike[str], data: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """`data` as indented JSON with a final newline; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=default) + "\n")
    return path


def read_mapping(path: str | os.PathLike[str], invalid: Callable[[str], Exception],
                 not_mapping: Callable[[Any], Exception], parse: Callable[[str], Any] = json.loads) -> dict[str, Any]:
    """A file's top-level mapping, parsed as JSON or with `parse` (e.g. yaml.safe_load). A file that does not
    decode or parse raises invalid(the parser's first line); another top level raises not_mapping(it)."""
    try:
        data = parse(Path(path).read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise invalid((str(exc).splitlines() or [""])[0]) from None
    if not isinstance(data, dict):
        raise not_mapping(data)
    return data


def read_yaml_mapping(path: str | os.PathLike[str], error: type[Exception] = ValueError,
                      what: str = "a mapping") -> dict[str, Any]:
    """A YAML file's top-level mapping (an empty file: {}); invalid YAML or another top level raises `error`
    with one line naming the file."""
    return read_mapping(path, lambda reason: error(f"{path}: invalid YAML: {reason}"),
                        lambda _: error(f"{path}: expected {what}"), parse=lambda text: yaml.safe_load(text) or {})


def safe_filename(text: str) -> str:
    """``text`` with every character other than letters, digits, '-', '_' and '.' replaced by '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))
