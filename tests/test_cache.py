"""Cache entries are published atomically, and concurrent writers of the same key do not fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cache import publish, staging_path


def test_staging_paths_differ_per_process(tmp_path: Path) -> None:
    dest = tmp_path / "entry"
    code = f"from pathlib import Path; from bench.cache import staging_path; print(staging_path(Path({str(dest)!r})))"
    other = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent.parent).stdout.strip())
    mine = staging_path(dest)
    assert other != mine and {other.parent, mine.parent} == {tmp_path}
    assert mine.name.startswith("entry.") and mine.name.endswith(".part")


def test_second_directory_publisher_keeps_the_first_copy(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    first, second = tmp_path / "a.part", tmp_path / "b.part"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    publish(first, dest)
    publish(second, dest)  # a plain rename raises 'Directory not empty' here
    assert (dest / "config.json").read_text() == "first"
    assert not first.exists() and not second.exists()


def test_file_publish_replaces_atomically(tmp_path: Path) -> None:
    dest, tmp = tmp_path / "stats.pt", tmp_path / "stats.pt.1.part"
    dest.write_text("old")
    tmp.write_text("new")
    assert publish(tmp, dest).read_text() == "new" and not tmp.exists()


def test_publish_without_a_destination_still_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        publish(tmp_path / "missing.part", tmp_path / "dest")
