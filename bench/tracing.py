"""Causal tracing: Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1.

For a prompt, its subject and the answer o (first token of the answer, as the paper's code uses):

* clean run: P(o);
* corrupted run: the subject tokens' input embeddings become x_i + ε, ε ~ N(0; ν²) with
  ν = 3 × the standard deviation of token embeddings over a corpus sample; P_*(o);
* corrupted-with-restoration run: the same noise, but one internal state takes its clean value again:
  - `hidden`: the residual stream after block l at token i, h_i^(l);
  - `mlp` / `attn`: the MLP (attention) output at token i in a window of `window` layers around l
    (10 in the paper, Fig. 1f–g): layers max(0, l − ⌊w/2⌋) … min(L, l + ⌈w/2⌉) − 1.
  The indirect effect of that state is IE = P_{*,clean}(o) − P_*(o) (§2.1), averaged over the noise
  samples; the average over facts is the paper's AIE.

Differences from the paper: ν comes from a corpus sample (the paper's code uses the embeddings of the
dataset's subjects); each prompt draws its noise once from a seeded generator and reuses the same draws
for every restoration, so all IE values of a prompt share one corrupted baseline. Restorations run
batched: every row of a forward pass is one (restoration, noise sample) pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmview.arch import ArchSpec
from lmview.tokens import prompt_ids, target_ids

KINDS = ("hidden", "mlp", "attn")
DEFAULT_WINDOW = 10
NOISE_SCALE = 3.0
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")

Restoration = tuple[tuple[str, int, int], ...]  # (kind, layer, token) states set back to clean


@dataclass
class FactTrace:
    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]  # [start, end) token indices of the subject
    p_clean: float
    p_corrupted: float
    effects: dict[str, list[list[float]]] = field(default_factory=dict)  # kind -> [tokens][layers] IE

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "subject": self.subject, "answer": self.answer, "tokens": self.tokens,
                "subject_range": list(self.subject_range), "p_clean": self.p_clean,
                "p_corrupted": self.p_corrupted, "indirect_effect": self.effects}


# --- model access --------------------------------------------------------------------

def traced_module(model: nn.Module, arch: ArchSpec, kind: str, layer: int) -> nn.Module:
    """The module whose output is the state of `kind` at `layer`: the block, its MLP or its attention."""
    block = arch.blocks(model)[layer]
    if kind == "hidden":
        return block
    if kind == "mlp":
        return block.mlp
    if kind == "attn":
        return block.attn if arch.family == "gpt2" else block.self_attn
    raise ValueError(f"unknown trace kind '{kind}'; valid: {', '.join(KINDS)}")


def _main_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def subject_token_range(tokenizer, prompt: str, subject: str, last: bool = False) -> tuple[int, int]:
    """[start, end) indices in prompt_ids(prompt) of the tokens covering the subject's first (last: last)
    occurrence."""
    at = prompt.rfind(subject) if last else prompt.find(subject)
    if at < 0 or not subject:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    stop = at + len(subject)
    if getattr(tokenizer, "is_fast", False):
        spans = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(spans) if b > a and a < stop and b > at]
        if hits:
            return hits[0], hits[-1] + 1
    start = len(prompt_ids(tokenizer, prompt[:at])) if at else 0
    return start, len(prompt_ids(tokenizer, prompt[:stop]))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def restoration(kind: str, layer: int, token: int, window: int, n_layers: int) -> Restoration:
    if kind == "hidden":
        return (("hidden", layer, token),)
    return tuple((kind, l, token) for l in window_layers(layer, window, n_layers))


@torch.no_grad()
def embedding_noise_std(model: nn.Module, tokenizer, texts: list[str], scale: float = NOISE_SCALE,
                        max_len: int = 128) -> float:
    """ν = scale × the standard deviation of the input embeddings of the texts' tokens (all coordinates)."""
    ids = [i for t in texts for i in prompt_ids(tokenizer, t)[:max_len]]
    if not ids:
        raise ValueError("the corpus sample for the noise level has no tokens")
    emb = model.get_input_embeddings().weight[torch.tensor(ids, device=model.get_input_embeddings().weight.device)]
    return scale * float(emb.float().std())


# --- the patched forward pass ---------------------------------------------------------------

@torch.no_grad()
def clean_states(model: nn.Module, arch: ArchSpec, ids: torch.Tensor, answer_id: int, kinds: tuple[str, ...]
                 ) -> tuple[dict[tuple[str, int], torch.Tensor], float]:
    """The clean run: every traced state [T, d] per (kind, layer), and P(answer)."""
    states: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for kind in kinds:
        for layer in range(arch.n_layers):
            def keep(_m, _i, out, key=(kind, layer)):
                states[key] = _main_output(out)[0].detach().clone()
            handles.append(traced_module(model, arch, kind, layer).register_forward_hook(keep))
    try:
        logits = model(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return states, float(logits.float().softmax(-1)[answer_id])


@torch.no_grad()
def restored_probs(model: nn.Module, arch: ArchSpec, ids: torch.Tensor, answer_id: int,
                   subject: tuple[int, int], noise: torch.Tensor | None,
                   clean: dict[tuple[str, int], torch.Tensor], plans: list[Restoration]) -> torch.Tensor:
    """P(answer) for each plan and noise sample: [len(plans), S] (S = 1 without noise).

    Row p·S + s adds noise[s] to the subject's input embeddings and sets the plan's states to clean.
    """
    samples = 1 if noise is None else noise.shape[0]
    rows = len(plans) * samples
    start, end = subject
    targets: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for p, plan in enumerate(plans):
        for kind, layer, token in plan:
            r, t = targets.setdefault((kind, layer), ([], []))
            r.extend(range(p * samples, (p + 1) * samples))
            t.extend([token] * samples)

    def corrupt(_m, _i, out):
        out = out.clone()
        out[:, start:end] += noise.repeat(len(plans), 1, 1).to(out.dtype)
        return out

    def restore_hook(key):
        row_idx = torch.tensor(targets[key][0], device=ids.device)
        tok_idx = torch.tensor(targets[key][1], device=ids.device)

        def hook(_m, _i, out):
            _main_output(out)[row_idx, tok_idx] = clean[key][tok_idx]
        return hook

    handles = [] if noise is None else [model.get_input_embeddings().register_forward_hook(corrupt)]
    handles += [traced_module(model, arch, kind, layer).register_forward_hook(restore_hook((kind, layer)))
                for kind, layer in targets]
    try:
        logits = model(input_ids=ids[None].expand(rows, -1), use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return logits.float().softmax(-1)[:, answer_id].reshape(len(plans), samples)


# --- one fact --------------------------------------------------------------------------

def trace_fact(model: nn.Module, arch: ArchSpec, tokenizer, prompt: str, subject: str, answer: str,
               noise_std: float, samples: int = 10, window: int = DEFAULT_WINDOW, seed: int = 0,
               kinds: tuple[str, ...] = KINDS, max_rows: int = 128) -> FactTrace:
    """IE of every (token, layer) state of each kind for one fact."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompt_ids(tokenizer, prompt), device=device)
    answer_id = target_ids(tokenizer, answer)[0]
    span = subject_token_range(tokenizer, prompt, subject)
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.randn(samples, span[1] - span[0], arch.d_model, generator=gen) * noise_std).to(device)
    clean, p_clean = clean_states(model, arch, ids, answer_id, kinds)
    p_corrupt = float(restored_probs(model, arch, ids, answer_id, span, noise, clean, [()]).mean())
    n_tokens, n_layers = len(ids), arch.n_layers
    effects = {}
    per_pass = max(1, max_rows // samples)
    for kind in kinds:
        plans = [restoration(kind, layer, token, window, n_layers)
                 for token in range(n_tokens) for layer in range(n_layers)]
        probs = torch.cat([restored_probs(model, arch, ids, answer_id, span, noise, clean, plans[i: i + per_pass])
                           for i in range(0, len(plans), per_pass)])
        effects[kind] = (probs.mean(1) - p_corrupt).reshape(n_tokens, n_layers).tolist()
    tokens = [tokenizer.decode([i]) for i in ids.tolist()]
    return FactTrace(prompt, subject, answer, tokens, span, p_clean, p_corrupt, effects)


# --- averages over facts -----------------------------------------------------------------

def category_rows(trace: FactTrace, kind: str) -> list[list[float] | None]:
    """The paper's token groups (Fig. 2): one [layers] row each, None where the prompt has no such token."""
    effects = torch.tensor(trace.effects[kind], dtype=torch.float64)
    start, end = trace.subject_range
    last = effects.shape[0] - 1

    def mean(lo: int, hi: int) -> list[float] | None:
        return effects[lo:hi].mean(0).tolist() if hi > lo else None

    return [effects[start].tolist(), mean(start + 1, end - 1), effects[end - 1].tolist(),
            effects[end].tolist() if end < last else None, mean(end + 1, last), effects[last].tolist()]


def average_by_category(traces: list[FactTrace], kind: str) -> list[list[float] | None]:
    """AIE per token group and layer: the mean over the facts that have that group."""
    out: list[list[float] | None] = []
    for row in range(len(CATEGORIES)):
        present = [rows[row] for rows in (category_rows(t, kind) for t in traces) if rows[row] is not None]
        out.append(torch.tensor(present, dtype=torch.float64).mean(0).tolist() if present else None)
    return out


def last_subject_curve(traces: list[FactTrace], kind: str) -> list[float]:
    """AIE of the last subject token at each layer: the curve used to pick the layer(s) to edit."""
    rows = [trace.effects[kind][trace.subject_range[1] - 1] for trace in traces]
    return torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
