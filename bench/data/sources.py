"""Registered datasets with a public source: `$KEBENCH_<NAME>`, the shared sample, the verified cache, or a
download once (its sha256 stored beside it and checked on every later load)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.data.counterfact import COUNTERFACT_DEFAULT, COUNTERFACT_ENV, load_counterfact
from bench.data.knowedit import load_knowedit
from bench.data.mquake import load_mquake
from bench.data.records import LoadedDataset
from bench.data.zsre import load_zsre
from lmview.cache import publish, staging_path
from lmview.case import DatasetError
from lmview.paths import SHARED_DATA


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


def load_source(name: str, seed: int) -> LoadedDataset:
    source = SOURCES[name]
    path = resolve_source(source)
    loaded = source.loader(path, seed=seed) if source.loader is load_mquake else source.loader(path)
    loaded.name = name
    return loaded
