"""`python -m bench hparams EDITOR --model M`: the hyperparameters a run would use, where each comes from, and
how they differ from the editor's published configuration.

Sources: the YAML file `bench run` would read (or `--hparams FILE`), else the default in the editor's
hyperparameter dataclass (`Editor.HPARAMS`, editors/settings.py). Published configurations are the files
below, each a transcription of a reference repository's file (their tests compare them key by key).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from lmview.models import DEFAULT_MODEL

NAME = "hparams"
HELP = "print an editor's resolved hyperparameters, their sources, and the differences from its published file"

# editor -> (file under editors/hparams/<folder>/, the reference it transcribes)
PUBLISHED: dict[str, tuple[str, str]] = {
    "rome": ("gpt2-xl.yaml", "kmeng01/rome hparams/ROME/gpt2-xl.json"),
    "r-rome": ("gpt2-xl.yaml", "scalable-model-editing/rebuilding-rome hparams/ROME/gpt2-xl.json"),
    "memit": ("gpt2-xl.yaml", "kmeng01/memit hparams/MEMIT/gpt2-xl.json"),
    "emmet": ("gpt2-xl.yaml", "scalable-model-editing/unified-model-editing hparams/EMMET/gpt2-xl.json"),
    "alphaedit": ("gpt2-xl.yaml", "jianghoucheng/AlphaEdit hparams/AlphaEdit/gpt2-xl.json"),
    "ft-l": ("gpt2-xl.yaml", "kmeng01/rome hparams/FT/gpt2-xl_constr.json"),
}
MODEL_FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
# the published GPT-2 sizes, for when their config cannot be fetched (offline): (family, layers)
GPT2_SIZES = {"gpt2": ("gpt2", 12), "gpt2-medium": ("gpt2", 24), "gpt2-large": ("gpt2", 36), "gpt2-xl": ("gpt2", 48)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("editor", help="registered editor name (see `list editors`)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--hparams", default=None, help="a YAML file instead of the editor's default lookup")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def model_family(model: str) -> tuple[str, int]:
    """(family, number of layers) from the model's config.json, without loading its weights."""
    from lmview.models import ModelError, model_dir

    try:
        path, _ = model_dir(model)
    except ModelError:
        if model in GPT2_SIZES:
            return GPT2_SIZES[model]
        raise
    config = json.loads((Path(path) / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in MODEL_FAMILIES:
        raise ValueError(f"model '{model}' has unsupported architecture '{kind}'; supported: "
                         f"{', '.join(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[kind], int(config.get("n_layer") or config.get("num_hidden_layers"))


def published_file(editor: str) -> tuple[Path, str] | None:
    from editors.base import HPARAMS_DIR, HPARAMS_FOLDERS

    method = editor.split(":")[-1]
    if method not in PUBLISHED:
        return None
    name, source = PUBLISHED[method]
    return HPARAMS_DIR / HPARAMS_FOLDERS.get(method, method) / name, source


def differences(ours: dict[str, Any], published: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, ours, published) for every key whose values differ; a missing key shows as '-'."""
    keys = sorted(set(ours) | set(published))
    return [(k, ours.get(k, "-"), published.get(k, "-")) for k in keys if ours.get(k, "-") != published.get(k, "-")]


def resolve(editor: str, model: str, override: str | None) -> dict[str, Any]:
    from editors.base import get_editor, load_hparams, shown_path

    cls = get_editor(editor)
    family, n_layers = model_family(model)
    values, path = load_hparams(editor, model, family, override, n_layers)
    path = shown_path(path)
    schema = cls.HPARAMS
    rows = [{"key": d["key"], "value": values.get(d["key"], d["default"]), "unit": d["unit"],
             "source": path if d["key"] in values else f"default ({schema.__module__})"}
            for d in schema.described() if d["key"] in values or d["key"] != "easyedit"]
    out: dict[str, Any] = {"editor": editor, "model": model, "family": family, "n_layers": n_layers,
                           "file": path, "hparams": rows}
    reference = published_file(editor)
    if reference is not None and reference[0].is_file():
        published = yaml.safe_load(reference[0].read_text()) or {}
        defaults = {d["key"]: d["default"] for d in schema.described()}
        out["published"] = {"file": shown_path(reference[0]), "reference": reference[1],
                            "differences": [{"key": k, "ours": a, "published": b}
                                            for k, a, b in differences({**defaults, **values},
                                                                       {**defaults, **published})]}
    return out


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def main(args: argparse.Namespace) -> int:
    report = resolve(args.editor, args.model, args.hparams)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['editor']} on {report['model']} ({report['family']}, {report['n_layers']} layers): {report['file']}")
    width = max(len(r["key"]) for r in report["hparams"]) if report["hparams"] else 4
    for row in report["hparams"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        print(f"  {row['key']:{width}s}  {_show(row['value']):24s}  {row['source']}{unit}")
    published = report.get("published")
    if published is None:
        print("published configuration: none on record for this editor")
    elif not published["differences"]:
        print(f"published configuration: {published['file']} ({published['reference']}): identical")
    else:
        print(f"published configuration: {published['file']} ({published['reference']}); differences:")
        for d in published["differences"]:
            print(f"  {d['key']:{width}s}  ours {_show(d['ours'])}, published {_show(d['published'])}")
    return 0
