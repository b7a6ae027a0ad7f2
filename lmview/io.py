"""Small file helpers shared by the harness and the libraries."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any],
                 default: Callable[[Any], Any] | None = None) -> None:
    """Append one JSON line and fsync it, so a crash never loses a finished row."""
    with open(Path(path), "a") as handle:
        handle.write(json.dumps(row, default=default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def safe_filename(text: str) -> str:
    """``text`` with every character other than letters, digits, '-', '_' and '.' replaced by '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))
