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


def read_yaml_mapping(path: str | os.PathLike[str], error: type[Exception] = ValueError,
                      what: str = "a mapping") -> dict[str, Any]:
    """A YAML file's top-level mapping (an empty file: {}); invalid YAML or another top level raises `error`
    with one line naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what}")
    return data


def safe_filename(text: str) -> str:
    """``text`` with every character other than letters, digits, '-', '_' and '.' replaced by '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))
