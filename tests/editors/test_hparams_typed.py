"""Typed hyperparameters (editors/settings.py): unknown keys, wrong types and out-of-range values fail at load
with one line naming the file and the key; defaults live in the editor's dataclass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from editors.base import HPARAMS_DIR, get_editor, load_hparams
from editors.settings import HparamsError

TINY_ROME = HPARAMS_DIR / "rome" / "tiny-gpt2.yaml"  # tiny-gpt2 has 4 layers


def _yaml_with(tmp_path: Path, **changes) -> Path:
    values = yaml.safe_load(TINY_ROME.read_text())
    values.update(changes)
    path = tmp_path / "rome.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _run_error(path: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    code = main(["run", "--editor", "rome", "--model", "tiny-gpt2", "--no-circuits", "--ppl-texts", "0", "--n", "1",
                 "--hparams", str(path), "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder
    return code, lines[0]


# --- `bench run` on a bad file: exit 2, one line naming the file and the key -----------------------------

@pytest.mark.usefixtures("one_thread", "cache")
def test_run_rejects_an_unknown_key(tmp_path, capsys):
    path = _yaml_with(tmp_path, v_lrr=0.1)
    code, line = _run_error(path, tmp_path, capsys)
    assert code == 2
    assert line.startswith(f"error: {path}: unknown key 'v_lrr' for rome (did you mean 'v_lr'?)")


@pytest.mark.usefixtures("one_thread", "cache")
def test_run_rejects_a_wrongly_typed_value(tmp_path, capsys):
    path = _yaml_with(tmp_path, v_num_grad_steps="ten")
    code, line = _run_error(path, tmp_path, capsys)
    assert (code, line) == (2, f"error: {path}: key 'v_num_grad_steps': expected an integer, got 'ten'")


@pytest.mark.usefixtures("one_thread", "cache")
def test_run_rejects_a_layer_beyond_the_model(tmp_path, capsys):
    path = _yaml_with(tmp_path, layers=[4])  # tiny-gpt2's layers are 0..3
    code, line = _run_error(path, tmp_path, capsys)
    assert (code, line) == (2, f"error: {path}: key 'layers': layer 4 is outside the model's layers 0..3")


# --- the checks themselves ----------------------------------------------------------------------------

def _rome(**values):
    return get_editor("rome").HPARAMS.from_mapping({"layers": [7], **values}, "f.yaml", n_layers=30)


def test_types_are_checked_per_annotation():
    assert _rome(v_lr=1).v_lr == 1 and _rome(v_lr="5e-1").v_lr == 0.5  # ints and YAML 1.1 exponent text are numbers
    for key, bad, expected in [("v_num_grad_steps", 2.5, "an integer"), ("v_num_grad_steps", True, "an integer"),
                               ("mom2_adjustment", 1, "a boolean"), ("v_lr", "fast", "a number"),
                               ("layers", 7, "a list of integers"), ("layers", [7.0], "a list of integers"),
                               ("context_template_length_params", [5, 10], "a list of lists of integers")]:
        with pytest.raises(HparamsError, match=f"^f.yaml: key '{key}': expected {expected}, got "):
            _rome(**{key: bad})


def test_ranges_choices_and_layers():
    with pytest.raises(HparamsError, match="key 'v_num_grad_steps': 0 must be at least 1"):
        _rome(v_num_grad_steps=0)
    with pytest.raises(HparamsError, match="key 'fact_token': 'last' is not one of 'subject_last' \\(δ's position"):
        _rome(fact_token="last")
    with pytest.raises(HparamsError, match="key 'v_loss_layer': layer 30 is outside the model's layers -1..29"):
        _rome(v_loss_layer=30)
    assert _rome(v_loss_layer=-1, layers=[0]).layers == [0] and _rome(layers=[29]).layers == [29]
    with pytest.raises(HparamsError, match="key 'layers': layer -1 is outside the model's layers 0..29"):
        _rome(layers=[-1])
    with pytest.raises(HparamsError, match="key 'layers': expected exactly 1 item, got 2"):
        _rome(layers=[3, 4])  # ROME edits one layer
    with pytest.raises(HparamsError, match="^f.yaml: missing key 'layers' for rome$"):
        get_editor("rome").HPARAMS.from_mapping({}, "f.yaml")
    with pytest.raises(HparamsError, match="key 'objective_optimization': 'target_new' is not one of 'prompt_last'"):
        get_editor("ft-l").HPARAMS.from_mapping({"layers": [0], "objective_optimization": "target_new"}, "f.yaml")
    # without the model, only the lower bound is known
    assert get_editor("rome").HPARAMS.from_mapping({"layers": [99]}, "f.yaml").layers == [99]


def test_a_required_key_and_optional_values():
    with pytest.raises(HparamsError, match="^f.yaml: missing key 'nullspace_threshold' for alphaedit$"):
        get_editor("alphaedit").HPARAMS.from_mapping({"layers": [1]}, "f.yaml")
    kn = get_editor("kn").HPARAMS.from_mapping({"layers": None, "batch_size": None}, "f.yaml", n_layers=4)
    assert kn.layers is None and kn.batch_size is None
    ft = get_editor("ft-l").HPARAMS
    assert ft.from_mapping({"layers": [0], "norm_constraint": False}, "f").norm_constraint is False
    assert ft.from_mapping({"layers": [0], "norm_constraint": 5e-4}, "f").norm_constraint == 5e-4
    with pytest.raises(HparamsError, match="expected a number or a boolean or null, got 'x'"):
        ft.from_mapping({"layers": [0], "norm_constraint": "x"}, "f")


def test_defaults_are_declared_once_per_editor():
    """Every editor's dataclass builds with no file at all; a file must name the edited layers (except KN's
    every-layer default and IKE), and AlphaEdit's threshold; subclasses override the defaults their method
    changes."""
    from editors.base import EDITORS, NATIVE

    for name in EDITORS.names():
        if name not in NATIVE and not name.startswith("easyedit:"):
            continue  # editors that tests register
        fields = {f.name: f for f in dataclasses.fields(EDITORS.get(name).HPARAMS)}
        required = {k for k, f in fields.items() if f.metadata.get("required")}
        assert required <= {"nullspace_threshold", "layers"}, name
        assert ("layers" in required) == (name not in ("kn", "ike", "easyedit:kn")), name
    memit, emmet, rome = (get_editor(n).HPARAMS() for n in ("memit", "emmet", "rome"))
    assert (memit.mom2_update_weight, emmet.mom2_update_weight) == (15000.0, 1.0)  # MEMIT's λ; EMMET's unscaled C
    assert (rome.context_template_length_params, memit.context_template_length_params) == ([[5, 10], [10, 10]],
                                                                                             [[10, 5]])


def test_every_shipped_file_fits_its_editor():
    from editors._easyedit_hparams import from_easyedit
    from editors.base import registry

    checked = 0
    for name, cls in registry().items():
        if ":" in name:
            continue
        for path in sorted((HPARAMS_DIR / name).rglob("*.yaml")):
            if path.name == "tune-grid.yaml":
                continue
            data = yaml.safe_load(path.read_text()) or {}
            if "alg_name" in data:
                data = from_easyedit(data, name, "gpt2" if "gpt2" in path.name else "llama", str(path))
            cls.HPARAMS.from_mapping(data, str(path))
            checked += 1
    assert checked >= 60


def test_an_easyedit_file_maps_onto_the_same_dataclass(tmp_path):
    path = tmp_path / "ee.yaml"
    path.write_text(yaml.safe_dump(dict(alg_name="ROME", model_name="gpt2", layers=[1], v_lr="5e-1",
                                        rewrite_module_tmp="transformer.h.{}.mlp.c_proj", v_lrr=1)))
    with pytest.raises(HparamsError, match=f"^{path}: unknown key 'v_lrr' for rome"):
        load_hparams("rome", "tiny-gpt2", "gpt2", str(path), n_layers=4)
    path.write_text(yaml.safe_dump(dict(alg_name="ROME", model_name="gpt2", layers=[9], v_lr="5e-1")))
    with pytest.raises(HparamsError, match="key 'layers': layer 9 is outside the model's layers 0..3"):
        load_hparams("rome", "tiny-gpt2", "gpt2", str(path), n_layers=4)
    path.write_text(yaml.safe_dump(dict(alg_name="ROME", model_name="gpt2", layers=[1], v_lr="5e-1")))
    data, _ = load_hparams("rome", "tiny-gpt2", "gpt2", str(path), n_layers=4)
    typed = get_editor("rome").HPARAMS.from_mapping(data)
    assert typed.v_lr == 0.5 and typed.easyedit == {"alg_name": "ROME", "model_name": "gpt2"}
