"""Shared machinery of the locate-then-edit editors (rome, r-rome, memit, emmet, alphaedit).

- Context prefixes (ROME paper §3.1; MEMIT Alg. 1): short texts sampled once from the unedited model
  with a fixed seed, plus the empty prefix (the bare prompt, always first). Cached per model and
  length plan, so every editor instance and every case reuses them.
- Keys (ROME eq. 3): the input of a layer's MLP output projection at the subject's last token,
  averaged over the prefixes: a flat mean for ROME (rome `rome/compute_u.py`), or the mean within
  each prefix-length group and then over the groups for MEMIT, EMMET and AlphaEdit
  (memit `memit/compute_ks.py`; `grouped_mean`).
- Value / residual target (ROME eq. 4, MEMIT eq. 16; rome `rome/compute_v.py`, memit
  `memit/compute_z.py`): a shift δ added to the residual stream right after `layer`'s MLP at the
  subject token of every prompt (the same as adding it to the MLP output: GPT-2 and Llama add the
  MLP output straight to the residual), found by Adam on
      mean_j NLL(o* | x_j + p) + kl_factor · KL(P_δ(·|"{s} is a") ‖ P_0(·|"{s} is a")) + v_weight_decay · ‖δ‖/‖ref‖²
  The KL is read at the subject's last token of the bare "{s} is a" only. After every step
  ‖δ‖ ≤ clamp_norm_factor · ‖ref‖. `ref` is the value being shifted on the bare prompt: the MLP
  output (bias included) for ROME, the residual z₀ for MEMIT. As in the reference loop, at most
  `v_num_grad_steps` forward passes and one Adam step fewer; it stops as soon as the total loss is
  below 5e-2. The layers below `layer` do not depend on δ, so they run once: each step starts from
  the cached residual after `layer` (`ShiftedForward`); at step 0 (δ = 0) the cached path is checked
  against the full forward and abandoned if they disagree.
- Key statistics C = E[k kᵀ] per layer (editors/keystats.py), all missing layers in one corpus pass.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from editors.base import EditorError
from editors.keystats import DEFAULT_SAMPLE_SEED, draw_sample, second_moments
from editors.settings import Hparams, setting
from lmview.tokens import TargetBatch, build_batch, prompt_ids

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

log = logging.getLogger("bench")

SEED_WORDS = ("The", "A", "In", "It", "When", "After", "This", "One", "We", "There")
ESSENCE_PROMPT = "{} is a"
CONTEXT_SEED = 1234
CONTEXT_TOP_K = 5
DEFAULT_LENGTH_PARAMS = [[5, 10], [10, 10]]
KEY_BATCH_ROWS = 64
EARLY_STOP_LOSS = 5e-2  # rome compute_v.py, memit compute_z.py: `if loss < 5e-2: break`

_PREFIX_CACHE: dict[tuple[int, str, str], list[str]] = {}


@dataclass(frozen=True)
class LocateHparams(Hparams):
    """What ROME, r-ROME, MEMIT, EMMET and AlphaEdit share: the edited layers, δ's optimisation and C."""

    layers: list[int] = setting([], layer=True, required=True, doc="the layers whose MLP output projection is rewritten")
    fact_token: str = setting("subject_last", choices=("subject_last",), doc="δ's position: the subject's last token")
    v_num_grad_steps: int = setting(20, minimum=1, unit="forward passes", doc="δ's optimisation; the last: no step")
    v_lr: float = setting(0.5, minimum=0.0, unit="Adam learning rate")
    v_loss_layer: int = setting(-1, minimum=-1, layer=True, doc="the layer whose logits the loss reads; -1: the last")
    v_weight_decay: float = setting(0.5, minimum=0.0, doc="weight of ‖δ‖ / ‖v0‖² in the loss")
    v_early_stop_loss: float = setting(EARLY_STOP_LOSS, unit="nats", doc="δ's optimisation stops below this loss")
    clamp_norm_factor: float = setting(4.0, minimum=0.0, unit="× ‖v0‖", doc="the largest ‖δ‖")
    kl_factor: float = setting(0.0625, minimum=0.0, doc="weight of the essence-prompt KL in the loss")
    mom2_adjustment: bool = setting(True, doc="C = E[k kᵀ] over a corpus sample; false: C = I")
    mom2_dataset: str = setting("wikipedia", doc="the corpus of C (lmview/corpus.py), or a JSON file of texts")
    mom2_n_samples: int = setting(1000, minimum=1, unit="texts")
    mom2_max_len: int = setting(128, minimum=1, unit="tokens per text")
    mom2_dtype: str = setting("float32", doc="recorded for EasyEdit; C is accumulated in float64")
    mom2_sample_seed: int = setting(DEFAULT_SAMPLE_SEED, doc="the seed of the corpus sample")
    context_template_length_params: list[list[int]] = setting(
        DEFAULT_LENGTH_PARAMS, minimum=0, doc="context prefixes sampled from the model: [[tokens, count], ...]")


# --- text and token positions -------------------------------------------------------

def subject_last_index(tokenizer: Any, text: str, subject_end: int) -> int:
    """Index (in prompt_ids(text)) of the token holding the subject's last character."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(spans) if b > a and a < subject_end]
        if hits:
            return hits[-1]
    return len(prompt_ids(tokenizer, text[:subject_end])) - 1  # slow tokenizers: prefix length


def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """Puts the subject into the first "{}"; returns the text and the character index where it ends."""
    at = template.index("{}")
    return template[:at] + subject + template[at + 2 :], at + len(subject)


def under_prefixes(tokenizer: Any, prefixes: list[str], template: str, subject: str) -> tuple[list[str], list[int]]:
    """The template under every prefix, subject filled in, and each text's subject-last token index."""
    texts, ends = zip(*(fill_subject(p + template, subject) for p in prefixes))
    return list(texts), [subject_last_index(tokenizer, t, e) for t, e in zip(texts, ends)]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()


# --- context prefixes -----------------------------------------------------------------

def context_prefixes(bundle: ModelBundle, length_params: list[list[int]] | None = None) -> list[str]:
    """"" plus "x_j. " for x_j sampled from the model; cached per (model, length plan)."""
    params = [[int(a), int(b)] for a, b in (length_params or DEFAULT_LENGTH_PARAMS)]
    key = (id(bundle.model), bundle.name, json.dumps(params))
    if key not in _PREFIX_CACHE:
        _PREFIX_CACHE[key] = [""] + [_clean(t) + ". " for t in _sample_contexts(bundle, params)]
    return list(_PREFIX_CACHE[key])


def prefix_groups(length_params: list[list[int]] | None = None) -> list[int]:
    """Sizes of the prefix groups in `context_prefixes` order: the bare prompt, then one per (length, n)
    with n > 0 (an empty group has no mean)."""
    return [1] + [int(n) for _length, n in (length_params or DEFAULT_LENGTH_PARAMS) if int(n) > 0]


def grouped_mean(rows: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Mean over dim 1 within each group of consecutive rows, then over the groups (memit compute_ks.py)."""
    if sum(groups) != rows.shape[1]:
        raise ValueError(f"prefix groups {groups} do not cover {rows.shape[1]} rows")
    return torch.stack([part.mean(1) for part in torch.split(rows, groups, dim=1)]).mean(0)


@torch.no_grad()
def _sample_contexts(bundle: ModelBundle, length_params: list[list[int]]) -> list[str]:
    """One batched `generate`: n continuations per (length, n), cut to that many new tokens."""
    tok, dev = bundle.tokenizer, bundle.device
    plan = [int(length) for length, n in length_params for _ in range(int(n))]
    if not plan:
        return []
    seeds = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(len(plan))]
    rows = [prompt_ids(tok, s) for s in seeds]
    width, pad = max(map(len, rows)), tok.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)  # left padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(CONTEXT_SEED)
        out = bundle.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=CONTEXT_TOP_K,
            max_new_tokens=max(plan), min_new_tokens=max(plan), pad_token_id=pad,
        )
    new = out[:, width:].tolist()
    return [s + tok.decode(new[i][: plan[i]], skip_special_tokens=True) for i, s in enumerate(seeds)]


# --- the optimisation batch ---------------------------------------------------------------

@dataclass
class SubjectRows:
    """Rewrite prompts (one per prefix, the bare one first), each followed by target_new, then the bare
    essence prompt "{s} is a" whose logit positions all point at the subject's last token (the KL row)."""

    batch: TargetBatch
    sel: torch.Tensor  # [B, T, 1] one-hot at each row's subject-last token (model dtype)
    n_rewrite: int


def subject_rows(bundle: ModelBundle, case: EditCase, prefixes: list[str]) -> SubjectRows:
    tok = bundle.tokenizer
    rewrite, r_idx = under_prefixes(tok, prefixes, case.prompt, case.subject)
    essence, e_idx = under_prefixes(tok, [""], ESSENCE_PROMPT, case.subject)
    texts = rewrite + essence
    batch = build_batch(tok, texts, [case.target_new] * len(texts), bundle.device)
    batch.logit_pos[len(rewrite):] = torch.tensor(e_idx, device=batch.logit_pos.device).unsqueeze(-1)
    sel = torch.zeros(batch.input_ids.shape, dtype=bundle.dtype)
    sel[torch.arange(len(texts)), torch.tensor(r_idx + e_idx)] = 1
    return SubjectRows(batch, sel.unsqueeze(-1).to(bundle.device), len(rewrite))


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class ShiftedForward:
    """Logits at the target positions with δ added to the residual after `layer` at the subject tokens.

    The first (full, gradient-free) pass records, at each row's subject token, the MLP keys (the input
    of the output projection), the MLP values (its output, bias included) and the residual after
    `layer`; the unshifted logits; and the inputs of every later block. Later calls start from there.
    """

    def __init__(self, bundle: ModelBundle, layer: int, rows: SubjectRows):
        self.bundle, self.layer, self.rows = bundle, layer, rows
        self._later: list[tuple[torch.nn.Module, tuple, dict]] | None = None
        self._checked = False
        self.keys, self.values, self.residual, self.logits0 = self._first_pass()

    @torch.no_grad()
    def _first_pass(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        arch, model = self.bundle.arch, self.bundle.model
        blocks = arch.blocks(model)
        seen: dict[str, Any] = {}
        later: list[tuple[torch.nn.Module, tuple, dict]] = []

        def keep_block_input(module, args, kwargs):
            later.append((module, args, kwargs))

        proj = arch.mlp_out_proj(model, self.layer)
        handles = [
            proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("keys", args[0])),
            proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("values", out)),
            blocks[self.layer].register_forward_hook(lambda _m, _a, out: seen.__setitem__("residual", _hidden(out))),
        ]
        handles += [b.register_forward_pre_hook(keep_block_input, with_kwargs=True) for b in blocks[self.layer + 1 :]]
        try:
            logits0 = self._full(None)
        finally:
            for h in handles:
                h.remove()
        if len(later) == len(blocks) - self.layer - 1:
            self._later = later
        sel = self.rows.sel
        self._residual_full = seen["residual"]
        at_subject = [(seen[name] * sel).sum(1).float() for name in ("keys", "values", "residual")]
        return at_subject[0], at_subject[1], at_subject[2], logits0

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = self.rows.batch.logit_pos
        picked = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.bundle.model.get_output_embeddings()(picked).float()

    def _full(self, delta: torch.Tensor | None) -> torch.Tensor:
        """The whole model, δ added by a hook on the MLP output projection of `layer`."""
        batch, sel = self.rows.batch, self.rows.sel
        proj = self.bundle.arch.mlp_out_proj(self.bundle.model, self.layer)
        handle = None
        if delta is not None:
            handle = proj.register_forward_hook(lambda _m, _a, out: out + sel * delta.to(out.dtype))
        try:
            hidden = self.bundle.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                  use_cache=False).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()
        return self._head(hidden)

    def _from_layer(self, delta: torch.Tensor) -> torch.Tensor:
        assert self._later is not None
        h = self._residual_full + self.rows.sel * delta.to(self._residual_full.dtype)
        for module, args, kwargs in self._later:
            if args:
                out = module(h, *args[1:], **kwargs)
            else:
                out = module(**{**kwargs, "hidden_states": h})
            h = _hidden(out)
        return self._head(self.bundle.arch.ln_final(self.bundle.model)(h))

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        if self._later is None:
            return self._full(delta)
        out = self._from_layer(delta)
        if not self._checked:  # the first call has δ = 0: it must reproduce the full forward
            self._checked = True
            scale = self.logits0.abs().max().clamp_min(1.0)
            if not torch.allclose(out.detach(), self.logits0, rtol=1e-4, atol=1e-4 * float(scale)):
                log.info("locate: cached lower layers disagree with the full forward; using full passes")
                self._later = None
                return self._full(delta)
        return out


def _row_target_logprobs(logits: torch.Tensor, batch: TargetBatch, rows: int) -> torch.Tensor:
    """Per-row [rows, J] log-probs of the target tokens (0 where masked)."""
    lp = logits[:rows].log_softmax(-1).gather(-1, batch.target_ids[:rows].unsqueeze(-1)).squeeze(-1)
    return lp * batch.target_mask[:rows]


def weight_decay_term(delta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """‖δ‖ / ‖ref‖² (rome compute_v.py, memit compute_z.py), multiplied by v_weight_decay in the loss."""
    return delta.norm() / ref.pow(2).sum()


def optimise_shift(fwd: ShiftedForward, hp: LocateHparams, ref: torch.Tensor,
                   stop: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """δ for ROME's v* / MEMIT's z (module docstring); returns δ and device-scalar stats.

    `stop(logits)`, when given, is asked after every forward pass (before that pass's step) whether to stop
    there as well (ENCORE's most-probable early stopping)."""
    batch, n_rw = fwd.rows.batch, fwd.rows.n_rewrite
    orig_kl_lp = fwd.logits0[n_rw:, 0].log_softmax(-1)
    n_tok = batch.target_mask[:n_rw].sum(-1)
    lp_before = _row_target_logprobs(fwd.logits0, batch, n_rw).sum(-1)
    delta = torch.zeros_like(ref, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=float(hp.v_lr))
    max_norm = float(hp.clamp_norm_factor) * ref.norm()
    steps, threshold = hp.v_num_grad_steps, float(hp.v_early_stop_loss)
    kl_factor, decay_factor = float(hp.kl_factor), float(hp.v_weight_decay)
    for step in range(steps):
        logits = fwd.logits(delta)
        lp = _row_target_logprobs(logits, batch, n_rw).sum(-1)
        nll = (-lp / n_tok).mean()
        edit_lp = logits[n_rw:, 0].log_softmax(-1)
        kl = (edit_lp.exp() * (edit_lp - orig_kl_lp)).sum(-1).mean()  # KL(edited ‖ original)
        loss = nll + kl_factor * kl + decay_factor * weight_decay_term(delta, ref)
        if stop is not None and stop(logits):
            break
        if step == steps - 1 or loss.item() < threshold:  # one host sync per step, for the early stop
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.mul_((max_norm / delta.norm().clamp_min(1e-12)).clamp(max=1.0))
    delta = delta.detach()
    return delta, {
        "v_loss_final": nll.detach(), "v_loss_total": loss.detach(), "kl_final": kl.detach(),
        "v_steps": torch.tensor(float(step), device=delta.device), "delta_norm": delta.norm(),
        "target_prob_before": lp_before.exp().mean(), "target_prob_after_opt": lp.detach().exp().mean(),
    }


# --- keys and residuals of several cases, several layers ---------------------------------

class _StopForward(Exception):
    pass


@torch.no_grad()
def keys_and_residual(bundle: ModelBundle, cases: list[EditCase], prefixes: list[str], key_layers: list[int],
                      residual_layer: int, groups: list[int] | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Keys at each of `key_layers`, averaged over the prefixes ([n_cases, d_mlp] float64: `grouped_mean`
    over `groups`, one group of all prefixes by default), and the residual after `residual_layer` on the
    bare prompt ([n_cases, d_model] float64)."""
    tok, arch, model = bundle.tokenizer, bundle.arch, bundle.model
    texts, idx = [], []
    for case in cases:
        t, i = under_prefixes(tok, prefixes, case.prompt, case.subject)
        texts += t
        idx += i
    rows = [prompt_ids(tok, t) for t in texts]
    keys = {layer: [] for layer in key_layers}
    residual: list[torch.Tensor] = []
    last_key = max(key_layers)
    state: dict[str, torch.Tensor] = {}

    def key_hook(layer: int):
        def hook(_m, args):
            keys[layer].append(args[0][state["rows"], state["pos"]].double())
            if layer == last_key and last_key > residual_layer:
                raise _StopForward
        return hook

    def residual_hook(_m, _a, out):
        residual.append(_hidden(out)[state["rows"], state["pos"]].double())
        if residual_layer >= last_key:
            raise _StopForward

    handles = [arch.mlp_out_proj(model, layer).register_forward_pre_hook(key_hook(layer)) for layer in key_layers]
    handles.append(arch.blocks(model)[residual_layer].register_forward_hook(residual_hook))
    pad = tok.pad_token_id or 0
    try:
        for start in range(0, len(rows), KEY_BATCH_ROWS):
            chunk = rows[start : start + KEY_BATCH_ROWS]
            width = max(map(len, chunk))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=bundle.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=bundle.device)
            state["rows"] = torch.arange(len(chunk), device=bundle.device)
            state["pos"] = torch.tensor(idx[start : start + KEY_BATCH_ROWS], device=bundle.device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    n = len(prefixes)
    groups = groups or [n]
    mean_keys = {layer: grouped_mean(torch.cat(k).reshape(len(cases), n, -1), groups) for layer, k in keys.items()}
    bare = torch.cat(residual).reshape(len(cases), n, -1)[:, 0]  # prefix 0 is "" (the bare prompt)
    return mean_keys, bare


# --- covariance access ------------------------------------------------------------------

def key_sample_args(hp: LocateHparams) -> dict[str, Any]:
    """The corpus sample the hyperparameters ask for: corpus, n_samples and seed (`mom2_sample_seed`)."""
    return dict(corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples, seed=hp.mom2_sample_seed)


def record_key_sample(record: dict[str, Any], hp: LocateHparams) -> None:
    """Adds `key_statistics_sample` (corpus, seed, n, hash of the texts) to the editor's hyperparameter
    mapping, which the run manifest writes."""
    if hp.mom2_adjustment:
        record["key_statistics_sample"] = dict(draw_sample(**key_sample_args(hp)).record)


def covariances(bundle: ModelBundle, layers: list[int], hp: LocateHparams) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float64) for every layer, missing ones computed in one corpus pass;
    the identity when `mom2_adjustment` is false."""
    if not hp.mom2_adjustment:
        eye = torch.eye(bundle.arch.d_mlp, dtype=torch.float64, device=bundle.device)
        return {layer: eye for layer in layers}
    stats = second_moments(bundle, list(layers), max_len=hp.mom2_max_len, **key_sample_args(hp))
    return {layer: c.double() for layer, c in stats.items()}


def check_layers(name: str, bundle: ModelBundle, hp: LocateHparams) -> list[int]:
    """The `layers` hyperparameter, validated: distinct, increasing, inside the model."""
    layers = list(hp.layers)
    n = bundle.arch.n_layers
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n:
        raise EditorError(f"{name}: layers must be distinct increasing indices in [0, {n - 1}]; got {layers}")
    check_loss_layer(name, bundle, hp)
    return layers


def check_loss_layer(name: str, bundle: ModelBundle, hp: LocateHparams) -> None:
    n = bundle.arch.n_layers
    if hp.v_loss_layer not in (-1, n - 1):
        raise EditorError(f"{name}: v_loss_layer must be the last layer ({n - 1}) or -1")
