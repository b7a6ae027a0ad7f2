"""What tests of several parts share: repository paths, small data files written under tmp_path, tiny-model
hyperparameters, circuit batches, and the CLI run in-process or as a subprocess. Import it as a module
(`from tests.helpers import ...`); pytest fixtures live in tests/conftest.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # third-party samples kept next to the checkout
FACTS_FILE = REPO_ROOT / "datasets" / "facts.json"
PUBLISHED = REPO_ROOT / "tests" / "published"  # transcriptions of the reference hyperparameter files

WORDS = ("the capital of France is Paris and the language of Germany is German while rivers run "
         "through old cities where people speak many languages about history music science art").split()
COUNTRY_CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
                    ("Japan", "Tokyo"), ("Egypt", "Cairo")]
CIRCUIT_PROMPTS = ("The capital of France is", "The official language of Germany is the", "Paris is in")


# --- data files --------------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_pseudo_corpus(folder: Path, n_paragraphs: int) -> Path:
    """Seeded pseudo-English paragraphs, enough tokens for a full-rank C on the tiny models."""
    rng = random.Random(0)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80))) + "." for _ in range(n_paragraphs)]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


def tiny_rome_hparams(folder: Path, topic: str, model: str = "tiny-gpt2") -> Path:
    """The shipped tiny-model ROME YAML with key statistics from a 30-paragraph corpus about `topic`."""
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(f"Text number {i} on {topic}." for i in range(30)))
    base = (REPO_ROOT / "editors" / "hparams" / "rome" / f"{model}.yaml").read_text()
    path = folder / "rome.yaml"
    path.write_text(base + f"\nmom2_dataset: {corpus}\nmom2_n_samples: 30\n")
    return path


def locate_hparams(editor: str, bundle, corpus: Path, **extra: Any) -> dict[str, Any]:
    """The editor's shipped hyperparameters for `bundle`, with key statistics from 40 texts of `corpus`."""
    from editors.base import load_hparams

    hp, _ = load_hparams(editor, bundle.name, bundle.arch.family)
    return {**hp, "mom2_dataset": str(corpus), "mom2_n_samples": 40, **extra}


def mlp_out_weight(bundle, layer: int):
    """A float64 copy of the layer's MLP output matrix (what locate-then-edit editors rewrite)."""
    return bundle.arch.mlp_out_matrix(bundle.model, layer).detach().double().clone()


def no_hparams(folder: Path) -> str:
    """A hyperparameter file with no keys, for the editors that take none."""
    path = folder / "none.yaml"
    path.write_text("# the test editors take no hyperparameters\n")
    return str(path)


def write_relation(folder: Path, name: str, template: str, samples: list[tuple[str, str]]) -> None:
    """<folder>/<name>.json in the LRE layout: one template (also the zero-shot one) and its samples."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"name": name, "prompt_templates": [template], "prompt_templates_zs": [template],
            "samples": [{"subject": s, "object": o} for s, o in samples]}
    (folder / f"{name}.json").write_text(json.dumps(data))


def capitals_root(folder: Path) -> Path:
    """An LRE folder with one factual relation, `capital`, of COUNTRY_CAPITALS."""
    write_relation(folder / "factual", "capital", "The capital of {} is", COUNTRY_CAPITALS)
    return folder


# --- circuits ---------------------------------------------------------------------------------------

def circuit_rows(bundle, prompts: tuple[str, ...] = CIRCUIT_PROMPTS) -> list[tuple[list[int], list[int], int]]:
    """Each prompt with two tokens swapped for others (a stand-in for another subject), answer ' Paris'."""
    tok = bundle.tokenizer
    answer = tok(" Paris", add_special_tokens=False).input_ids[0]
    rows = []
    for text in prompts:
        ids = tok(text).input_ids
        corrupt = list(ids)
        corrupt[len(ids) - 2] = (ids[len(ids) - 2] + 11) % len(tok)
        corrupt[0] = (ids[0] + 5) % len(tok)
        rows.append((ids, corrupt, answer))
    return rows


def circuit_batch(bundle, rows=None, padding_side: str = "right", corrupt_answers=None):
    """The PairBatch of circuit_rows (or of the given rows)."""
    from circuits.activations import PairBatch

    rows = rows if rows is not None else circuit_rows(bundle)
    return PairBatch.from_rows(rows, bundle.tokenizer.pad_token_id, bundle.device, padding_side, corrupt_answers)


def assert_bridge_predicts(bundle, prompt: str, token_id: int) -> None:
    """The TransformerBridge (what circuit discovery runs) predicts token_id after prompt, and its last-token
    logits are the Hugging Face model's to 1e-4: an edit in the HF modules is seen through the bridge."""
    import torch

    from lmview.tokens import prompt_ids

    ids = torch.tensor([prompt_ids(bundle.tokenizer, prompt)], device=bundle.device)
    with torch.no_grad():
        hf = bundle.model(input_ids=ids).logits[0, -1]
        bridged = bundle.bridge()(ids)[0, -1]
    assert int(bridged.argmax()) == token_id
    assert torch.allclose(hf, bridged, atol=1e-4)


# --- the CLI ----------------------------------------------------------------------------------------

def analysis_report(command: str, model: str, lre_root: Path, out: Path, *options: str) -> dict[str, Any]:
    """Runs `bench <command>` in-process on CPU over the relations under lre_root, checks exit 0, and returns
    <out>/<command>.json."""
    from bench.cli import main

    assert main([command, "--model", model, "--lre-root", str(lre_root), *options, "--device", "cpu",
                 "--output", str(out)]) == 0
    return read_json(out / f"{command}.json")


def bench_process(args: list[str], cache_root: Path, **popen: Any) -> subprocess.Popen:
    """`python -m bench <args>` as a subprocess from the repository root, with its own model cache, one
    thread and unbuffered output; stdout and stderr are pipes of text."""
    env = dict(os.environ, KEBENCH_CACHE=str(cache_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
