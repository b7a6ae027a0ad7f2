"""KN: Knowledge Neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers").

Neurons are the MLP's intermediate units: the input of the MLP output projection (GPT-2: GELU(c_fc x);
Llama: SiLU(gate x) ⊙ up x), read at the last prompt token. For a prompt x with true answer y
(the first token of target_true), P_x(ŵ) is the model's probability of y when the activations of one
layer's neurons at that position are set to ŵ.

1. Attribution (paper eq. 3-4), integrated gradients from the zero baseline, Riemann sum with m = `steps`:
       Attr(w_i) = w̄_i ∫_0^1 ∂P_x(α w̄)/∂w_i dα  ≈  (w̄_i / m) Σ_{k=1}^m ∂P_x((k/m) w̄)/∂w_i.
   As in the paper's code (and EasyEdit's), all neurons of one layer are scaled together, so the
   attributions of a layer sum to P_x(w̄) − P_x(0) as m grows (completeness).
2. Coarse neurons per prompt (§3.2): Attr > t · max Attr over all attributed layers, t = `adaptive_threshold`.
3. Refining (§3.2): keep the neurons that are coarse for at least a fraction `p` of the prompts
   (rewrite prompt + paraphrases; the paper's "more than p%" is taken as ≥ here).
4. Updating facts (§5.1): for every kept neuron i of layer l, its value slot (column i of the output
   projection, FFN(val)_i) becomes FFN(val)_i − λ₁·t + λ₂·t′, with t, t′ the word embeddings of the
   true and the new answer (`lambda_true` λ₁, `lambda_new` λ₂; the paper sets 1 and 8).

Differences, deliberate:
- Answers are multi-token here: attribution uses the first token of target_true, and the update uses the
  first token's embedding of each target (the paper's answers are single tokens).
- The word embedding is the output (unembedding) row of the token; for tied-embedding models (GPT-2,
  SmolLM2) this is the input embedding the paper means.
- `layers` restricts which layers are attributed (all by default; the paper attributes all layers).
- EasyEdit's KN reads the pre-activation output of c_fc/gate_proj, subtracts 2× the embedding of the
  model's current top-1 token (not target_true's) and adds every token embedding of the new target
  once (λ₁ = 2, λ₂ = 1 for one-token answers), and, with `refine: false` (its configs), skips step 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from editors.base import EditOutcome, Editor, EditorError
from editors.grace import original_module
from editors.settings import Hparams, setting
from lmview.tokens import prompt_ids, target_ids

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle


ERASE_TOKENS = ("target_true", "prediction")


# --- pure functions ------------------------------------------------------------------

def integrated_gradients(f: Callable[[torch.Tensor], torch.Tensor], activation: torch.Tensor, steps: int,
                         batch_size: int) -> torch.Tensor:
    """(w̄/m) Σ_{k=1}^m ∇f((k/m) w̄); f maps rows [R, d] to [R] with rows independent of each other."""
    alphas = torch.arange(1, steps + 1, device=activation.device, dtype=activation.dtype) / steps
    total = torch.zeros_like(activation)
    for chunk in alphas.split(batch_size):
        scaled = (chunk[:, None] * activation[None]).requires_grad_(True)
        (grad,) = torch.autograd.grad(f(scaled).sum(), scaled)
        total += grad.sum(0)
    return activation * total / steps


def coarse_neurons(scores: torch.Tensor, adaptive_threshold: float) -> set[tuple[int, int]]:
    """(row, neuron) pairs whose attribution exceeds t · max (scores [n_layers, d_mlp])."""
    threshold = adaptive_threshold * scores.max()
    return {(int(r), int(c)) for r, c in torch.nonzero(scores > threshold).tolist()}


def refine(per_prompt: list[set[tuple[int, int]]], p: float) -> list[tuple[int, int]]:
    """Neurons that are coarse for at least a fraction p of the prompts, sorted."""
    need = max(1, math.ceil(p * len(per_prompt) - 1e-9))
    counts: dict[tuple[int, int], int] = {}
    for neurons in per_prompt:
        for n in neurons:
            counts[n] = counts.get(n, 0) + 1
    return sorted(n for n, c in counts.items() if c >= need)


# --- the editor ------------------------------------------------------------------------

@dataclass(frozen=True)
class KnHparams(Hparams):
    editor = "kn"
    layers: list[int] | None = setting(None, layer=True, doc="layers whose neurons are attributed; null: every layer")
    steps: int = setting(20, minimum=1, doc="integrated-gradient steps")
    batch_size: int | None = setting(None, minimum=1, doc="IG steps per forward batch; null: all steps at once")
    adaptive_threshold: float = setting(0.2, minimum=0.0, maximum=1.0, unit="× the largest attribution")
    p: float = setting(0.5, minimum=0.0, maximum=1.0, doc="share of the prompts a neuron must be selected in")
    lambda_true: float = setting(1.0, doc="scale of the erased token's embedding subtracted from each value slot")
    lambda_new: float = setting(8.0, doc="scale of the new answer's embedding added to each value slot")
    erase_token: str = setting("target_true", choices=ERASE_TOKENS, doc="which token's embedding is subtracted")
    refine: bool = setting(True, doc="attribute over the rewrite prompt and its paraphrases; false: the prompt alone")


class KnowledgeNeurons(Editor, hparams=KnHparams):
    """Knowledge Neurons (Dai et al. 2022): IG attribution to MLP neurons, then their value slots edited."""

    hp: KnHparams

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        n = bundle.arch.n_layers
        self.layers = list(range(n)) if self.hp.layers is None else list(self.hp.layers)
        if not self.layers:
            raise EditorError(f"kn: layers must be a non-empty list of layers in 0..{n - 1}")
        self.steps = self.hp.steps
        self.batch_size = self.hp.batch_size or self.steps
        self.threshold = float(self.hp.adaptive_threshold)
        self.p = float(self.hp.p)
        if not 0 < self.threshold < 1 or not 0 < self.p <= 1:
            raise EditorError("kn: need 0 < adaptive_threshold < 1 and 0 < p <= 1")
        self.last_neurons: list[tuple[int, int]] = []

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(layer) for layer in self.layers]

    # -- attribution --
    def answer_probability(self, ids: list[int], layer: int, answer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """f(rows [R, d_mlp]) = P(answer | prompt) with layer's neurons at the last token set to each row."""
        model, dev = self.bundle.model, self.bundle.device
        pos = len(ids) - 1
        proj = original_module(self.bundle.arch.mlp_out_proj(model, layer))

        def f(rows: torch.Tensor) -> torch.Tensor:
            def patch(_m: torch.nn.Module, args: tuple) -> tuple:
                hidden = args[0].clone()
                hidden[:, pos] = rows.to(hidden.dtype)
                return (hidden, *args[1:])

            handle = proj.register_forward_pre_hook(patch)
            try:
                input_ids = torch.tensor([ids], device=dev).expand(len(rows), -1)
                hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, pos]
                logits = model.get_output_embeddings()(hidden).float()
            finally:
                handle.remove()
            return logits.softmax(-1)[:, answer]

        return f

    @torch.no_grad()
    def activations(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """The neurons' activations w̄ at the last token, per attributed layer."""
        seen: dict[int, torch.Tensor] = {}
        handles = [original_module(self.bundle.arch.mlp_out_proj(self.bundle.model, layer)).register_forward_pre_hook(
            lambda _m, args, layer=layer: seen.__setitem__(layer, args[0][0, -1].float().clone()))
            for layer in self.layers]
        try:
            self.bundle.model(input_ids=torch.tensor([ids], device=self.bundle.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return seen

    def attribution(self, prompt: str, answer: int) -> torch.Tensor:
        """Attr for every attributed layer's neurons: [len(layers), d_mlp]."""
        ids = prompt_ids(self.bundle.tokenizer, prompt)
        acts = self.activations(ids)
        return torch.stack([integrated_gradients(self.answer_probability(ids, layer, answer), acts[layer],
                                                 self.steps, self.batch_size) for layer in self.layers])

    def knowledge_neurons(self, case: EditCase) -> list[tuple[int, int]]:
        """(layer, neuron) pairs, refined over the rewrite prompt and the paraphrases."""
        answer = target_ids(self.bundle.tokenizer, case.target_true)[0]
        prompts = (case.rewrite_prompt, *case.paraphrases) if self.hp.refine else (case.rewrite_prompt,)
        per_prompt = [coarse_neurons(self.attribution(prompt, answer), self.threshold) for prompt in prompts]
        return [(self.layers[row], neuron) for row, neuron in refine(per_prompt, self.p)]

    @torch.no_grad()
    def erased_token(self, case: EditCase) -> int:
        """The token whose embedding is subtracted: target_true's first (paper) or the model's top-1 (EasyEdit)."""
        if self.hp.erase_token == "target_true":
            return target_ids(self.bundle.tokenizer, case.target_true)[0]
        ids = torch.tensor([prompt_ids(self.bundle.tokenizer, case.rewrite_prompt)], device=self.bundle.device)
        return int(self.bundle.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())

    # -- the edit --
    @torch.no_grad()
    def update_values(self, neurons: list[tuple[int, int]], true_token: int, new_token: int) -> None:
        """FFN(val)_i ← FFN(val)_i − λ₁·e(true) + λ₂·e(new) for every neuron (paper §5.1)."""
        emb = self.bundle.model.get_output_embeddings().weight
        shift = (float(self.hp.lambda_new) * emb[new_token].float()
                 - float(self.hp.lambda_true) * emb[true_token].float())
        for layer, neuron in neurons:
            w = self.bundle.arch.mlp_out_matrix(self.bundle.model, layer)  # [d_model, d_mlp] view
            w[:, neuron] += shift.to(w.dtype)

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        tok = self.bundle.tokenizer
        edited_layers: set[int] = set()
        counts = []
        for case in cases:
            neurons = self.knowledge_neurons(case)
            self.update_values(neurons, self.erased_token(case), target_ids(tok, case.target_new)[0])
            self.last_neurons = neurons
            edited_layers.update(layer for layer, _ in neurons)
            counts.append(len(neurons))
        stats = {"n_neurons": sum(counts) / max(len(counts), 1), "n_layers_edited": len(edited_layers),
                 "n_cases": len(cases)}
        return EditOutcome(layers=sorted(edited_layers), stats=stats)
