"""Edit-case records and dataset loaders.

Understood layouts (detected per file from its first record, so any file works as ``--dataset PATH``):

* the built-in fact set (``datasets/facts.json``): an object with a ``cases`` list, one record per
  fact, prompts stored as templates with ``{}``;
* CounterFact (Meng et al. 2022), either EasyEdit's flattened layout (full prompt plus ``subject``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_*``) or the original ROME layout
  (``requested_rewrite`` with ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``generation_prompts``, ``attribute_prompts``); the layout is detected per record;
* zsRE in the MEND layout (``src, alt, answers, rephrase, loc, loc_ans, subject``), scored with
  EasyEdit's top-1 token accuracy; ``loc`` keeps its ``nq question: `` prefix, as MEND and EasyEdit do;
* KnowEdit (Zhang et al. 2024): ``subject, prompt, target_new, ground_truth``, ``portability`` and
  ``locality`` groups of ``{prompt, ground_truth}``; an answer given as a list of aliases uses its first;
* MQuAKE-CF (Zhong et al. 2023): only cases with one requested rewrite and two-hop questions, so a
  single edit must change the multi-hop answer; the questions become portability prompts answered by
  ``new_answer``; the neighbourhood is single-hop cloze facts of other cases;
* ``lre:<relation>``: an LRE relation file (Hernandez et al., used by the Knowledge Circuits paper);
  the counterfactual target is another object of the relation chosen with a seed, the paraphrases
  are the relation's other templates, and the neighbourhood is other subjects with their true objects.

Registered names with a public source (``counterfact``, ``zsre``, ``knowedit``, ``mquake``) are read
from ``$KEBENCH_<NAME>`` when set, else from the shared sample under ``../shared/data`` when present,
else from the cache (``lmview.cache.cache_dir()/datasets``), else downloaded once with a short timeout.
A download's sha256 is stored beside it on first use and checked on every later load.

Structural problems (a record that is not an object, a missing or mistyped field) raise
:class:`DatasetError` naming the file, record index and field. Cases that are well formed but
unusable (subject missing from the prompt, empty target, new == true) are collected in
``LoadedDataset.rejected`` so a run can report them and carry on.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

from bench.data.builtin import SPLIT_RULE, load_builtin, load_facts
from bench.data.counterfact import load_counterfact
from bench.data.knowedit import load_knowedit
from bench.data.lre import load_lre
from bench.data.mquake import load_mquake
from bench.data.records import LoadedDataset, parse_records, read_bytes
from bench.data.sources import SOURCES, load_source
from bench.data.zsre import load_zsre
from lmview.case import DatasetError
from lmview.registry import Registry

# name -> a loader taking the run's seed
DATASETS: Registry[Callable[[int], LoadedDataset]] = Registry("dataset")
DATASETS.add("facts", lambda seed: load_facts("test"),
             "the built-in fact set, datasets/facts.json: its test split (what the leaderboard reports)")
DATASETS.add("facts:test", lambda seed: load_facts("test"), "the same as facts")
DATASETS.add("facts:dev", lambda seed: load_facts("dev"), f"the built-in facts' dev split, for `bench tune` ({SPLIT_RULE})")
DATASETS.add("facts:all", lambda seed: load_facts("all"), "the built-in facts, both splits")
for _name, _source in SOURCES.items():
    DATASETS.add(_name, partial(load_source, _name), _source.description)
DEFAULT_DATASET = "facts"
LRE_PREFIX = "lre:"
OTHER_DATASETS = f"{LRE_PREFIX}<relation>, or a path to a .json/.jsonl file (layout detected)"


def dataset_descriptions() -> dict[str, str]:
    """One line per registered name, for `python -m bench list datasets`."""
    out = {}
    for entry in DATASETS.entries():
        out[entry.name] = entry.description
        source = SOURCES.get(entry.name)
        if source is not None:
            env = os.environ.get(source.env)
            where = (f"${source.env}={env}" if env else str(source.shared) if source.shared and source.shared.is_file()
                     else f"{source.cache_path()} (downloaded from {source.url} on first use)")
            out[entry.name] += f"; read from {where}"
    out[f"{LRE_PREFIX}<relation>"] = "edit cases from an LRE relation under ../shared/data/lre, or an LRE file by path"
    return out


# --- layout detection for files given by path -------------------------------

def detect_layout(first: Any) -> str:
    """Which loader reads a file whose first record (or top-level object) is ``first``."""
    if not isinstance(first, dict):
        return "builtin"
    if "samples" in first and "prompt_templates" in first:
        return "lre"
    if isinstance(first.get("requested_rewrite"), list):
        return "mquake"
    if "src" in first and "alt" in first:
        return "zsre"
    if isinstance(first.get("portability"), dict) or isinstance(first.get("locality"), dict):
        return "knowedit"
    if "requested_rewrite" in first or "ground_truth" in first:
        return "counterfact"
    return "builtin"


def _load_path(p: Path, seed: int) -> LoadedDataset:
    data = read_bytes(p)
    if p.suffix == ".json":
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None  # the loader reports it with a line number
        if isinstance(doc, dict) and detect_layout(doc) == "lre":
            return load_lre(str(p), seed)
    records, _ = parse_records(p, data)
    layout = detect_layout(records[0]) if records else "builtin"
    if layout == "mquake":
        return load_mquake(p, seed)
    loaders = {"zsre": load_zsre, "knowedit": load_knowedit, "counterfact": load_counterfact,
               "builtin": load_builtin}
    return loaders[layout](p)


def load_dataset(name_or_path: str | os.PathLike[str], seed: int = 0) -> LoadedDataset:
    """A registered dataset by name, ``lre:<relation>``, or a .json/.jsonl file by path (layout detected).

    ``seed`` picks the counterfactual targets of ``lre:`` cases and the MQuAKE neighbourhood.
    """
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS.get(key)(seed)
    if key.startswith(LRE_PREFIX):
        return load_lre(key[len(LRE_PREFIX):], seed)
    p = Path(key)
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        return _load_path(p, seed)
    if p.is_file():
        raise DatasetError(f"{p}: unsupported file type {p.suffix!r} (expected .json or .jsonl)")
    raise DatasetError(f"unknown dataset '{key}'; valid: {', '.join(DATASETS.names())}, {OTHER_DATASETS}")
