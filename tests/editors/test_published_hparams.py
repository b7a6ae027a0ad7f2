"""Every YAML that says it is published holds the reference file's values, key by key.

tests/published/<editor>-<model>.json: a transcription of one reference hparams file (`values`, with its
repository, path and commit in `source`) plus `implicit` values the reference code fixes outside that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from editors.base import HPARAMS_DIR
from editors.keystats import DEFAULT_SAMPLE_SEED
from tests.helpers import PUBLISHED, REPO_ROOT

TRANSCRIPTIONS = sorted(PUBLISHED.glob("*.json"))
MARKER = ": published."  # in the first line of a YAML that claims the published values

# Reference keys with no hyperparameter here, and why. Every other reference key must appear under its own name.
NOT_HYPERPARAMETERS = {
    "rewrite_module_tmp": "module path: the architecture adapter (lmview/models.py) finds the MLP output projection",
    "layer_module_tmp": "module path: the architecture adapter finds the blocks",
    "mlp_module_tmp": "module path: the architecture adapter finds the MLP",
    "attn_module_tmp": "module path: unused by these editors",
    "ln_f_module": "module path: the architecture adapter finds the final norm",
    "lm_head_module": "module path: the model's own output embeddings",
    "model_name": "which model the file is for: the YAML's file name",
}
# Reference keys whose only value is the behaviour implemented here.
FIXED_BEHAVIOUR = {"layer_selection": "all", "calculate_objective_value": False}


def _ours(doc: dict) -> dict:
    return yaml.safe_load((REPO_ROOT / doc["ours"]).read_text())


@pytest.mark.parametrize("path", TRANSCRIPTIONS, ids=[p.stem for p in TRANSCRIPTIONS])
def test_published_yaml_matches_reference(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert len(doc["source"]["commit"]) == 40 and doc["source"]["path"].startswith("hparams/")
    ours = _ours(doc)
    assert MARKER in (REPO_ROOT / doc["ours"]).read_text().splitlines()[0]
    for key, value in doc["values"].items():
        if key in NOT_HYPERPARAMETERS:
            continue
        if key in FIXED_BEHAVIOUR:
            assert value == FIXED_BEHAVIOUR[key], f"{key}: the reference uses {value!r}, only {FIXED_BEHAVIOUR[key]!r} is implemented"
            continue
        assert key in ours, f"{doc['ours']}: missing {key} (reference {value!r})"
        assert ours[key] == value, f"{doc['ours']}: {key} = {ours[key]!r}, reference {value!r}"
    for key, spec in doc["implicit"].items():
        assert ours.get(key) == spec["value"], f"{doc['ours']}: {key} = {ours.get(key)!r}, reference code {spec['value']!r}"
    extra = set(ours) - set(doc["values"]) - set(doc["implicit"])
    assert not extra, f"{doc['ours']}: keys with no published value: {sorted(extra)}"


def test_every_published_claim_has_a_transcription() -> None:
    claimed = {str(p.relative_to(REPO_ROOT)) for p in HPARAMS_DIR.glob("*/*.yaml")
               if MARKER in p.read_text().splitlines()[0]}
    transcribed = {json.loads(p.read_text())["ours"] for p in TRANSCRIPTIONS}
    assert claimed == transcribed
    assert {"editors/hparams/rome/gpt2-xl.yaml", "editors/hparams/emmet/gpt2-xl.yaml"} <= claimed


def test_key_statistics_seed_is_the_reference_one() -> None:
    """rome/layer_stats.py draws its Wikipedia sample with random_sample=1."""
    assert DEFAULT_SAMPLE_SEED == 1


def test_the_transcription_test_can_fail(tmp_path: Path, monkeypatch) -> None:
    """A one-value change in our YAML is caught (ROME gpt2-medium's clamp 3 written as 4)."""
    doc = json.loads((PUBLISHED / "rome-gpt2-medium.json").read_text())
    changed = {**_ours(doc), "clamp_norm_factor": 4}
    yaml_path = tmp_path / "editors" / "hparams" / "rome" / "gpt2-medium.yaml"
    yaml_path.parent.mkdir(parents=True)
    yaml_path.write_text("# ROME on gpt2-medium: published.\n" + yaml.safe_dump(changed))
    transcription = tmp_path / "t.json"
    transcription.write_text(json.dumps(doc))
    monkeypatch.setitem(globals(), "REPO_ROOT", tmp_path)
    with pytest.raises(AssertionError, match="clamp_norm_factor"):
        test_published_yaml_matches_reference(transcription)
