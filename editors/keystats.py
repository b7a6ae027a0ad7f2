"""Second moment C = E[k kᵀ] of MLP keys (the input of the MLP output projection) over corpus tokens.

ROME (Meng et al. 2022, eq. 2) and MEMIT use C as the key covariance of the layer
they rewrite. It depends only on the weights, the layer and the texts, so it is
computed once and cached under `cache_dir()/stats` with a JSON sidecar recording
what determined it, and an integrity record (`<file>.entry`, JSON: the key it was built from and the
file's sha256) that is checked when the file is first loaded in a process.

The texts are a seeded random sample of the corpus, as rome `rome/layer_stats.py` samples
Wikipedia (`tally(..., random_sample=1)`: a `random.Random(seed)` shuffle of the article
indices, the first n kept). For the offline Wikipedia corpus the last `HELDOUT_TAIL` texts
are never drawn: they are the held-out perplexity texts (bench/perplexity.py).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmview.cache import cache_dir, discard_entry, entry_problem, publish, sha256_text, staging_path, write_record
from lmview.corpus import DEFAULT_CORPUS, load_corpus
from lmview.io import safe_filename
from lmview.tokens import prompt_ids

if TYPE_CHECKING:
    from lmview.models import ModelBundle

log = logging.getLogger("bench")

DEFAULT_N_SAMPLES = 1000
DEFAULT_MAX_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_SAMPLE_SEED = 1  # rome layer_stats.py: random_sample=1
HELDOUT_TAIL = {DEFAULT_CORPUS: 1000}  # texts at the end of a corpus kept out of every sample

_SAMPLES: dict[tuple[str, int, int], KeySample] = {}


@dataclass(frozen=True)
class KeySample:
    """The texts C is computed on, and a record of how they were drawn (for manifests and the cache key)."""

    texts: list[str]
    record: dict[str, Any]


def sample_indices(population: int, n_samples: int, seed: int) -> list[int]:
    """The first n of a `random.Random(seed)` shuffle of range(population), as rome's FixedRandomSubsetSampler."""
    order = list(range(population))
    random.Random(seed).shuffle(order)
    return order[:n_samples]


def draw_sample(corpus: str = DEFAULT_CORPUS, n_samples: int = DEFAULT_N_SAMPLES,
                seed: int = DEFAULT_SAMPLE_SEED) -> KeySample:
    """The seeded random sample of `corpus` (cached per process); its record names the exact texts by hash."""
    key = (corpus, int(n_samples), int(seed))
    if key not in _SAMPLES:
        texts, identity = load_corpus(corpus)
        tail = min(HELDOUT_TAIL.get(corpus, 0), len(texts) - 1)
        picked = [texts[i] for i in sample_indices(len(texts) - tail, int(n_samples), int(seed))]
        digest = sha256_text("\n".join(sorted(sha256_text(t) for t in picked)))
        record = dict(corpus=identity, seed=int(seed), n_requested=int(n_samples), n_texts=len(picked),
                      population=len(texts) - tail, excluded_tail=tail, texts_sha256=digest)
        _SAMPLES[key] = KeySample(picked, record)
    return _SAMPLES[key]


class _StopForward(Exception):
    """Raised by the last needed hook so later layers and the LM head are not computed."""


def second_moment(bundle: ModelBundle, layer: int, corpus: str = DEFAULT_CORPUS,
                  n_samples: int = DEFAULT_N_SAMPLES, max_len: int = DEFAULT_MAX_LEN,
                  batch_size: int = DEFAULT_BATCH_SIZE, seed: int = DEFAULT_SAMPLE_SEED) -> torch.Tensor:
    """C = E[k kᵀ] at `layer`: [d_mlp, d_mlp] float32 on the model device (cached)."""
    return second_moments(bundle, [layer], corpus, n_samples, max_len, batch_size, seed)[layer]


def second_moments(bundle: ModelBundle, layers: list[int], corpus: str = DEFAULT_CORPUS,
                   n_samples: int = DEFAULT_N_SAMPLES, max_len: int = DEFAULT_MAX_LEN,
                   batch_size: int = DEFAULT_BATCH_SIZE, seed: int = DEFAULT_SAMPLE_SEED) -> dict[int, torch.Tensor]:
    """C for several layers; the uncached ones are computed together in one pass over the sample."""
    sample = draw_sample(corpus, n_samples, seed)
    texts, identity = sample.texts, sample.record["corpus"]
    paths = {layer: _cache_path(bundle, layer, sample.record, max_len) for layer in layers}
    keys = {layer: _cache_key(bundle, layer, sample.record, max_len) for layer in layers}
    found = {layer: _load_verified(paths[layer], keys[layer], bundle) for layer in layers}
    missing = sorted(layer for layer, matrix in found.items() if matrix is None)
    if missing:
        log.info("statistics: computing E[kkᵀ] of %s layer(s) %s on %d texts of %s (max_len %d)",
                 bundle.name, ",".join(map(str, missing)), len(texts), identity, max_len)
        start = time.perf_counter()
        sums, count = _accumulate(bundle, missing, texts, max_len, batch_size)
        seconds = time.perf_counter() - start
        for layer in missing:
            meta = dict(model=bundle.name, model_sha256=bundle.provenance.get("sha256"), layer=layer,
                        corpus=identity, n_samples=n_samples, n_texts=len(texts), max_len=max_len,
                        n_tokens=count, dtype_model=str(bundle.dtype), seconds=round(seconds, 1),
                        sample=sample.record)
            _save(paths[layer], (sums[layer] / max(count, 1)).float().cpu(), meta, keys[layer])
            found[layer] = _load_verified(paths[layer], keys[layer], bundle)
            if found[layer] is None:
                raise RuntimeError(f"key statistics {paths[layer]} are unusable right after they were computed; "
                                   f"delete the file and run again")
    return found


def _cache_key(bundle: ModelBundle, layer: int, sample: dict[str, Any], max_len: int) -> str:
    """The model, the layer, max_len and the sample (corpus identity, seed and the texts' hash)."""
    return json.dumps([bundle.provenance.get("sha256") or bundle.name, layer, sample["corpus"], sample["seed"],
                       sample["n_requested"], sample["texts_sha256"], max_len])


def _load_verified(path: Path, key: str, bundle: ModelBundle) -> torch.Tensor | None:
    """The cached C when its content matches its record (checked once per process), has the layer's
    shape and is finite; None (after one warning line, the file removed) when it must be recomputed.
    A file from before records existed is adopted when it passes the shape and finiteness checks."""
    problem = entry_problem(path, key)
    if problem == "is missing":
        return None
    if problem is not None and problem != "has no integrity record":
        log.warning("cache: key statistics %s %s; recomputing them", path, problem)
        discard_entry(path)
        return None
    d = bundle.arch.d_mlp
    try:
        matrix = torch.load(path, map_location=bundle.device)
        if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (d, d):
            raise ValueError(f"expected a [{d}, {d}] tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("it holds NaN or inf")
    except Exception as exc:  # noqa: BLE001 - a damaged file raises whatever torch's unpickler raises
        log.warning("cache: key statistics %s are unreadable (%s: %s); recomputing them", path, type(exc).__name__,
                    (str(exc).splitlines() or [""])[0][:120])
        discard_entry(path)
        return None
    if problem == "has no integrity record":
        write_record(path, key)
    return matrix


def _cache_path(bundle: ModelBundle, layer: int, sample: dict[str, Any], max_len: int) -> Path:
    """Keyed by the model, the layer, max_len and the sample (corpus identity, seed and the texts' hash)."""
    key = _cache_key(bundle, layer, sample, max_len)
    safe = safe_filename(bundle.name.split("/")[-1])
    n = sample["n_requested"]
    return cache_dir() / "stats" / safe / f"mom2-L{layer}-n{n}-len{max_len}-s{sample['seed']}-{sha256_text(key)[:16]}.pt"


def _save(path: Path, matrix: torch.Tensor, meta: dict, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    torch.save(matrix, tmp)
    publish(tmp, path, key)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def _batches(bundle: ModelBundle, texts: list[str], max_len: int, batch_size: int):
    """Right-padded (ids, mask) batches, texts grouped by length to limit padding."""
    rows = [prompt_ids(bundle.tokenizer, t)[:max_len] for t in texts]
    rows = sorted((r for r in rows if r), key=len)
    pad = bundle.tokenizer.pad_token_id or 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids = torch.full((len(chunk), len(chunk[-1])), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        yield ids.to(bundle.device), mask.to(bundle.device)


@torch.no_grad()
def _accumulate(bundle: ModelBundle, layers: list[int], texts: list[str], max_len: int,
                batch_size: int) -> tuple[dict[int, torch.Tensor], int]:
    """Sums of k kᵀ over non-padded tokens (float64) per layer, and the token count."""
    d, dev = bundle.arch.d_mlp, bundle.device
    sums = {layer: torch.zeros(d, d, dtype=torch.float64, device=dev) for layer in layers}
    count = torch.zeros((), dtype=torch.long, device=dev)
    state: dict[str, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, args):
            keys = args[0][state["mask"]].double()  # [n_tokens, d_mlp]
            sums[layer].addmm_(keys.T, keys)
            if layer == layers[-1]:
                raise _StopForward
        return hook

    handles = [bundle.arch.mlp_out_proj(bundle.model, layer).register_forward_pre_hook(hook_for(layer))
               for layer in layers]
    try:
        for ids, mask in _batches(bundle, texts, max_len, batch_size):
            state["mask"] = mask.bool()
            count += mask.sum()
            try:
                bundle.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return sums, int(count.item())
