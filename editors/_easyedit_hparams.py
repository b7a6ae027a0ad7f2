"""Translation between EasyEdit's hyperparameter files and ours, both directions.

EasyEdit files are recognised by their `alg_name` key. `from_easyedit` turns one into our scheme (it is
what `--hparams FILE` does with such a file); `to_easyedit` builds the fields of EasyEdit's hparams
dataclass from ours (what the `easyedit:*` reference editors hand to EasyEdit). Key by key:

- Same name, same meaning, passed through: layers, fact_token, v_num_grad_steps (forward passes, the
  last one without an Adam step, on both sides), v_lr, v_loss_layer, v_weight_decay (‖δ‖/‖v0‖² on both
  sides), clamp_norm_factor, kl_factor, mom2_adjustment, mom2_dataset, mom2_n_samples, mom2_dtype,
  mom2_update_weight, layer_selection, context_template_length_params (ROME/MEMIT); layers, lr,
  num_steps, weight_decay, norm_constraint, batch_size (FT); steps, batch_size, adaptive_threshold, p,
  refine (KN).
- `mom2_adjustment`: kept. EasyEdit's gpt2-xl ROME file has shipped it as false at times, while the ROME
  paper (and our default) uses the covariance; a false value is kept and logged as a warning.
- `mom2_dataset`: the name is kept; our "wikipedia" is the offline corpus of lmview/corpus.py, not the
  Hugging Face `wikipedia` 20200501.en dump EasyEdit downloads.
- Module templates (`rewrite_module_tmp`, `layer_module_tmp`, `mlp_module_tmp`, `attn_module_tmp`,
  `ln_f_module`, `lm_head_module`): the native editors always edit the MLP output projection, so
  `rewrite_module_tmp` must name it for the model's family (error otherwise). All six are kept under
  the `easyedit` key, where the reference editors read them.
- `alg_name` must fit the editor (ROME: rome, r-rome; MEMIT: memit, emmet, alphaedit; FT: ft-l (and
  easyedit:ft), or ft-m when `objective_optimization` is target_new; KN: kn). `model_name`, `device`, `stats_dir`,
  `model_parallel`, `max_length`, `results_dir`, `objective_optimization` configure EasyEdit's own
  runner: kept under `easyedit` for the record, unused (`--model` and `--device` decide).
- KN: this EasyEdit snapshot ignores `lr_scale` and `n_toks`. For single-token answers its edit
  subtracts 2 × the current top-1 token's embedding from each selected neuron's value slot and adds
  1 × the new answer's (the new answer is indexed with a token list, which takes its loop branch that
  adds each token once). So an EasyEdit KN file sets our `lambda_true` to 2 and `lambda_new` to 1;
  `lr_scale` and `n_toks` are kept under `easyedit` only.
"""

from __future__ import annotations

import logging
from typing import Any

from editors.errors import EditorError

log = logging.getLogger("bench")

# Our editors each EasyEdit algorithm may configure.
EDITORS_OF_ALG = {"ROME": {"rome", "r-rome"}, "MEMIT": {"memit", "emmet", "alphaedit"}, "FT": {"ft", "ft-l", "ft-m"},
                  "KN": {"kn"}}

TEMPLATE_KEYS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                 "lm_head_module")
RUNNER_KEYS = ("alg_name", "model_name", "device", "stats_dir", "model_parallel", "max_length", "results_dir",
               "objective_optimization")
UNUSED_KEYS = {"KN": ("n_toks", "lr_scale"), "FT": ("kl_factor",)}
KN_FIXED_LAMBDAS = dict(lambda_true=2.0, lambda_new=1.0, erase_token="prediction")  # what the snapshot's modify_weights does

FAMILY_TEMPLATES = {
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                 ln_f_module="transformer.ln_f", lm_head_module="lm_head"),
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm", lm_head_module="lm_head"),
}
INPUT_EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}

def method_of(editor: str) -> str:
    """'easyedit:rome' -> 'rome'; native names unchanged."""
    return editor.split(":")[-1]


def is_easyedit_file(data: dict[str, Any]) -> bool:
    return "alg_name" in data


def _check_alg(alg: str, editor: str, data: dict[str, Any], source: str) -> None:
    allowed = EDITORS_OF_ALG.get(alg)
    if allowed is None:
        raise EditorError(f"{source}: EasyEdit alg_name '{alg}' is not supported; supported: "
                          f"{', '.join(sorted(EDITORS_OF_ALG))}")
    method = method_of(editor)
    if alg == "FT" and "objective_optimization" in data:
        allowed = {"ft-m"} if data["objective_optimization"] == "target_new" else {"ft", "ft-l"}
    if method not in allowed:
        raise EditorError(f"{source}: an EasyEdit {alg} file cannot configure editor '{editor}' "
                          f"(it fits {', '.join(sorted(allowed))})")


def _check_templates(templates: dict[str, str], family: str, source: str) -> None:
    expected = FAMILY_TEMPLATES.get(family, {}).get("rewrite_module_tmp")
    given = templates.get("rewrite_module_tmp")
    if given is not None and expected is not None and given.removesuffix(".weight") != expected:
        raise EditorError(f"{source}: rewrite_module_tmp '{given}' is not the MLP output projection of a "
                          f"{family} model ('{expected}')")


def from_easyedit(data: dict[str, Any], editor: str, family: str, source: str) -> dict[str, Any]:
    """An EasyEdit hyperparameter mapping -> ours (the EasyEdit-only keys under 'easyedit')."""
    alg = str(data["alg_name"]).upper()
    _check_alg(alg, editor, data, source)
    templates = {k: data[k] for k in TEMPLATE_KEYS if k in data}
    _check_templates(templates, family, source)
    runner = {k: data[k] for k in (*RUNNER_KEYS, *UNUSED_KEYS.get(alg, ())) if k in data}
    skipped = set(TEMPLATE_KEYS) | set(RUNNER_KEYS) | set(UNUSED_KEYS.get(alg, ()))
    ours = {k: _number(v) for k, v in data.items() if k not in skipped}
    if alg == "KN":
        ours.update(KN_FIXED_LAMBDAS)
    if ours.get("mom2_adjustment") is False:
        log.warning("%s: mom2_adjustment is false (C = I); the ROME paper, and our default, use the key "
                    "covariance", source)
    ours["easyedit"] = {**runner, **templates}
    return ours


def _number(value: Any) -> Any:
    """EasyEdit's loader turns '5e-4' style strings (YAML 1.1 reads them as text) into floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# --- ours -> EasyEdit ----------------------------------------------------------------------------------

def module_templates(family: str, parameter_names: set[str], given: dict[str, Any] | None = None) -> dict[str, str]:
    """EasyEdit's six module templates for a model; `lm_head` falls back to the tied input embedding."""
    if family not in FAMILY_TEMPLATES:
        raise EditorError(f"EasyEdit reference: unsupported model family '{family}'")
    templates = dict(FAMILY_TEMPLATES[family])
    if "lm_head.weight" not in parameter_names:
        templates["lm_head_module"] = INPUT_EMBEDDING[family]
    templates.update({k: v for k, v in (given or {}).items() if k in TEMPLATE_KEYS})
    return templates


def to_easyedit(alg: str, hparams: dict[str, Any], *, family: str, n_layers: int, parameter_names: set[str],
                model_name: str, device: str) -> dict[str, Any]:
    """The keyword arguments of EasyEdit's <alg>HyperParams for our hyperparameters on one model."""
    given = hparams.get("easyedit") or {}
    common = dict(alg_name=alg, model_name=model_name, device=device)
    if alg in ("ROME", "MEMIT"):
        loss_layer = int(hparams.get("v_loss_layer", -1))
        fields = dict(
            layers=[int(x) for x in hparams["layers"]], fact_token=hparams.get("fact_token", "subject_last"),
            v_num_grad_steps=int(hparams.get("v_num_grad_steps", 20)), v_lr=float(hparams.get("v_lr", 0.5)),
            v_loss_layer=n_layers - 1 if loss_layer < 0 else loss_layer,
            v_weight_decay=float(hparams.get("v_weight_decay", 0.5)),
            clamp_norm_factor=float(hparams.get("clamp_norm_factor", 4.0)),
            kl_factor=float(hparams.get("kl_factor", 0.0625)),
            mom2_adjustment=bool(hparams.get("mom2_adjustment", True)),
            mom2_dataset=str(hparams.get("mom2_dataset", "wikipedia")),
            mom2_n_samples=int(hparams.get("mom2_n_samples", 1000)),
            mom2_dtype=str(hparams.get("mom2_dtype", "float32")), stats_dir="unused: covariance injected",
            **module_templates(family, parameter_names, given), **common)
        if alg == "ROME":
            fields["context_template_length_params"] = hparams.get("context_template_length_params",
                                                                   [[5, 10], [10, 10]])
        else:
            fields.update(layer_selection=hparams.get("layer_selection", "all"),
                          mom2_update_weight=float(hparams.get("mom2_update_weight", 15000)))
        return fields
    if alg == "FT":
        constraint = hparams.get("norm_constraint", 5e-4)
        return dict(
            layers=[int(x) for x in hparams["layers"]], num_steps=int(hparams.get("num_steps", 25)),
            lr=float(hparams.get("lr", 5e-4)), weight_decay=float(hparams.get("weight_decay", 0.0)), kl_factor=0.0,
            # EasyEdit applies the L-inf projection only when the value is a float
            norm_constraint=float(constraint) if constraint not in (None, False) else False,
            batch_size=int(hparams.get("batch_size", 64)),
            **module_templates(family, parameter_names, given), **common)
    if alg == "KN":
        return dict(
            lr_scale=1.0, n_toks=10,  # both unused by the snapshot
            refine=bool(hparams.get("refine", False)),
            batch_size=int(hparams.get("batch_size", 20)), steps=int(hparams.get("steps", 20)),
            adaptive_threshold=float(hparams.get("adaptive_threshold", 0.2)), p=float(hparams.get("p", 0.4)),
            **common)
    raise EditorError(f"EasyEdit reference: no hyperparameter mapping for {alg}")
