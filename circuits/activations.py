"""Clean/corrupted prompt pairs, the attribution metric, and sender outputs read through bridge hooks.

Hook names follow TransformerLens: `hook_embed`, `hook_pos_embed`,
`blocks.{l}.attn.hook_z`, `blocks.{l}.hook_mlp_out`, `blocks.{l}.ln1.hook_in`,
`blocks.{l}.ln2.hook_in`, `ln_final.hook_in`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from circuits.graph import Graph
from lmview.arch import ArchSpec


@dataclass
class PairBatch:
    """Padded (right by default, or left) clean and corrupted prompts of equal token length per row.

    The metric is read at `answer_pos` only; padded positions have attention_mask 0 and are
    masked out of every attribution sum."""

    clean_ids: torch.Tensor  # [B, P]
    corrupt_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    answer_pos: torch.Tensor  # [B] last real position
    answer_ids: torch.Tensor  # [B] first token of the answer
    corrupt_answer_ids: torch.Tensor | None = None  # [B] the corrupted prompt's answer (logit-diff), optional
    ablate_mask: torch.Tensor | None = None  # [B, P] bool: the positions whose edges are ablated (None: all)

    @classmethod
    def from_rows(cls, rows: list[tuple[list[int], list[int], int]], pad_id: int, device: torch.device,
                  padding_side: str = "right", corrupt_answers: list[int] | None = None,
                  ablate_from: list[int] | None = None) -> PairBatch:
        """rows: (clean ids, corrupted ids of the same length, answer token id). ablate_from: per row, the
        first token position (in the unpadded row) whose edges are ablated; earlier positions (few-shot
        demonstrations) always run clean."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not '{padding_side}'")
        width = max(len(c) for c, _, _ in rows)
        clean = torch.full((len(rows), width), pad_id, dtype=torch.long)
        corrupt = clean.clone()
        mask = torch.zeros_like(clean)
        for i, (c, x, _) in enumerate(rows):
            if len(c) != len(x):
                raise ValueError("clean and corrupted prompts must have the same token length")
            span = slice(width - len(c), width) if padding_side == "left" else slice(0, len(c))
            clean[i, span], corrupt[i, span], mask[i, span] = torch.tensor(c), torch.tensor(x), 1
        pos = torch.full((len(rows),), width - 1) if padding_side == "left" else mask.sum(1) - 1
        answers = torch.tensor([a for _, _, a in rows])
        wrong = torch.tensor(corrupt_answers).to(device) if corrupt_answers is not None else None
        ablate = None
        if ablate_from is not None:
            ablate = mask.bool()
            for i, ((c, _, _), start) in enumerate(zip(rows, ablate_from, strict=True)):
                offset = width - len(c) if padding_side == "left" else 0
                ablate[i, : offset + start] = False
            ablate = ablate.to(device)
        return cls(clean.to(device), corrupt.to(device), mask.to(device), pos.to(device), answers.to(device), wrong,
                   ablate)


def answer_logprob(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """The metric: log p(answer's first token) at the answer position, per row [B]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer_pos].float().log_softmax(-1)[rows, batch.answer_ids]


def embed_hooks(bridge: Any) -> list[str]:
    return ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in bridge.hook_dict else [])


def head_outputs(z: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Per-head contributions to the residual stream: [B, P, H, d_head] x [H, d_head, D] -> [H, B, P, D]."""
    return torch.einsum("bphe,hed->hbpd", z, w_o)


@dataclass
class SenderCapture:
    """Records every sender's output during one forward pass, as [n_upstream, B, P, D]."""

    graph: Graph
    arch: ArchSpec
    model: torch.nn.Module = field(repr=False)  # hook libraries may repr bound methods: keep that cheap
    outputs: torch.Tensor | None = field(default=None, repr=False)

    def hooks(self, bridge: Any) -> list[tuple[str, Callable]]:
        hooks: list[tuple[str, Callable]] = [(name, self._embed) for name in embed_hooks(bridge)]
        for layer in range(self.arch.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_z", self._heads(layer)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp(layer)))
        return hooks

    def _buffer(self, act: torch.Tensor) -> torch.Tensor:
        if self.outputs is None:
            self.outputs = act.new_zeros((self.graph.n_upstream, *act.shape))
        return self.outputs

    def _embed(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        self._buffer(act)[0] += act.detach()
        return act

    def _heads(self, layer: int) -> Callable:
        w_o = self.arch.o_weight(self.model, layer)

        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            start = self.graph.head_index(layer, 0)
            out = head_outputs(z.detach(), w_o)
            self._buffer(out[0])[start: start + self.arch.n_heads] = out
            return z

        return fn

    def _mlp(self, layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            self._buffer(act)[self.graph.mlp_index(layer)] = act.detach()
            return act

        return fn


def run_capture(bridge: Any, graph: Graph, arch: ArchSpec, model: torch.nn.Module, ids: torch.Tensor,
                mask: torch.Tensor, extra_hooks: list[tuple[str, Callable]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass; returns (logits, sender outputs [n_upstream, B, P, D])."""
    capture = SenderCapture(graph, arch, model)
    logits = bridge.run_with_hooks(ids, fwd_hooks=capture.hooks(bridge) + (extra_hooks or []), attention_mask=mask)
    return logits, capture.outputs
